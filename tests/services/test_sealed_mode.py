"""The sealed protection mode end to end (embedded system): no pixel, mask or private label
reaches the cloud; retrieval works on owner-sent Fisher vectors; hits open bit-exactly at the
hospital; records are bound to their identity."""

from __future__ import annotations

import base64
import io
import json
import logging

import numpy as np
import pytest

from pecbir_contracts.layout import CollectionLayout, image_id_for
from pecbir_contracts.png import encode_png
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_harness.embedded import EmbeddedSystem
from pecore.keys import MasterKey
from pecore.sealing import SealedIdentity, open_with_data_key
from tests.services.helpers import labelled_set, npy_bytes

COLLECTION = "sealed-brain"
N_IMAGES, N_TRAIN = 18, 12
PATCH_MODEL = {"n_components": "4", "n_regions": "2", "patch_size": "5", "radius": "2"}


def _ingest(system, image, mask, label, train):
    answer = system.encryptor.post(
        f"/v1/collections/{COLLECTION}/images",
        files={"image": ("i.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
        data={"label": str(label), "train": "true" if train else "false"},
    )
    assert answer.status_code == 202, answer.text
    return answer.json()


def _publish(system, images, masks, collection=COLLECTION):
    return system.encryptor.post(
        f"/v1/collections/{collection}/patch-model",
        files=[("images", (f"{i}.npy", npy_bytes(im))) for i, im in enumerate(images)]
        + [("masks", (f"{i}.npy", npy_bytes(m))) for i, m in enumerate(masks)],
        data=PATCH_MODEL,
    )


def _search(system, image, mask, k=10, collection=COLLECTION):
    answer = system.encryptor.post(
        f"/v1/collections/{collection}/search",
        files={"image": ("q.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
        data={"k": str(k)},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    """A full sealed-mode run (patch model, uploads, training, search, decrypt, key release)."""
    root = tmp_path_factory.mktemp("sealed")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger()
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with EmbeddedSystem(
            root, master=MasterKey.from_seed(21), sealed_collections=frozenset({COLLECTION})
        ) as system:
            images, masks, labels = labelled_set(N_IMAGES, seed=5)
            published = _publish(system, images, masks)
            assert published.status_code == 201, published.text
            uploads = [
                _ingest(system, image, mask, label, train=i < N_TRAIN)
                for i, (image, mask, label) in enumerate(zip(images, masks, labels, strict=True))
            ]
            trained = system.gateway.post(
                f"/v1/collections/{COLLECTION}/model/train", json={"dim": 2}
            )
            assert trained.status_code == 202, trained.text
            system.wait_searchable(COLLECTION, N_IMAGES)
            found = _search(system, images[N_TRAIN], masks[N_TRAIN], k=3)
            for hit in found["hits"]:
                assert system.encryptor.get(hit["plain_url"]).status_code == 200
            yield {
                "system": system,
                "images": images,
                "masks": masks,
                "labels": labels,
                "uploads": uploads,
                "records": records,
                "patch_model": published.json()["patch_model"],
            }
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _image_id(run, i):
    return run["uploads"][i]["upload"]["image_id"]


def test_hits_open_bit_exactly_at_the_hospital(sealed):
    system = sealed["system"]
    for i in (0, N_TRAIN, N_IMAGES - 1):
        answer = system.encryptor.get(
            f"/v1/collections/{COLLECTION}/images/{_image_id(sealed, i)}/plain",
            params={"format": "npy"},
        )
        assert answer.status_code == 200, answer.text
        plain = np.load(io.BytesIO(answer.content), allow_pickle=False)
        assert plain.dtype == sealed["images"][i].dtype
        assert plain.tobytes() == sealed["images"][i].tobytes()
        # Every label appears at the hospital, a non-training one only after decryption.
        assert answer.headers["X-Pecbir-Label"] == str(sealed["labels"][i])


def test_search_ranks_the_query_s_own_copy_first_and_is_stable(sealed):
    system = sealed["system"]
    for i in (0, 7, N_TRAIN + 2):
        answers = [_search(system, sealed["images"][i], sealed["masks"][i]) for _ in range(3)]
        rankings = [[hit["image_id"] for hit in a["hits"]] for a in answers]
        assert rankings[0][0] == _image_id(sealed, i)
        assert rankings[1] == rankings[0] == rankings[2]


def test_the_cloud_reads_labels_of_training_templates_only(sealed):
    system = sealed["system"]
    for i in range(N_IMAGES):
        stored = system.gateway.get(
            f"/v1/collections/{COLLECTION}/images/{_image_id(sealed, i)}"
        ).json()
        assert stored["mode"] == "sealed"
        expected = int(sealed["labels"][i]) if i < N_TRAIN else None
        assert stored["label"] == expected
    hits = _search(system, sealed["images"][0], sealed["masks"][0], k=N_IMAGES)["hits"]
    by_id = {hit["image_id"]: hit["label"] for hit in hits}
    assert [by_id[_image_id(sealed, i)] for i in range(N_TRAIN, N_IMAGES)] == [None] * 6


def _needles(run) -> dict[str, bytes]:
    """Byte strings that would show a plain image, a mask or a private label in the cloud."""
    found: dict[str, bytes] = {}
    for i, (image, mask) in enumerate(zip(run["images"], run["masks"], strict=True)):
        raw = image.tobytes()
        found[f"image {i} raw row"] = raw[image.shape[1] * 2 * 20 : image.shape[1] * 2 * 21]
        found[f"image {i} 8-bit row"] = (image // 16).astype(np.uint8).tobytes()[48 * 20 : 48 * 21]
        found[f"mask {i} packed"] = np.packbits(mask, axis=None).tobytes()
        found[f"mask {i} png"] = encode_png(mask)
        found[f"mask {i} as bytes row"] = mask.astype(np.uint8).tobytes()[48 * 24 : 48 * 25]
    return found


def test_no_pixel_mask_or_private_label_reaches_store_or_logs(sealed):
    system = sealed["system"]
    keys = system.store.list("")
    assert any(k.endswith("sealed.bin") for k in keys) and any("/features/" in k for k in keys)
    assert not any(k.endswith(("cipher.png", "mask.png")) for k in keys)
    cloud = b"".join(system.store.get(k) for k in keys)
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in sealed["records"]).encode()
    assert len(sealed["records"]) > 10, "the run logged nothing: this test would prove nothing"
    for name, needle in _needles(sealed).items():
        assert len(needle) >= 8, name
        assert needle not in cloud, f"{name} is in the cloud's store"
        assert needle not in logs, f"{name} is in the logs"
    # Private labels: no record, feature file or model manifest of the cloud names one.
    layout = CollectionLayout(system.tenant, COLLECTION)
    for i in range(N_TRAIN, N_IMAGES):
        meta = json.loads(system.store.get(layout.meta(_image_id(sealed, i))))
        assert meta["label"] is None
    manifests = [k for k in keys if k.endswith("manifest.json")]
    counts = json.loads(system.store.get(manifests[0]))["label_counts"]
    assert sum(counts.values()) == N_TRAIN


def test_key_release_hands_out_that_image_s_data_key_only(sealed):
    system = sealed["system"]
    image_id = _image_id(sealed, 3)
    released = system.encryptor.post(
        "/v1/keys/release", json={"collection": COLLECTION, "image_id": image_id}
    )
    assert released.status_code == 200, released.text
    body = released.json()
    assert body["mode"] == "sealed"
    data_key = base64.b64decode(body["data_key"])
    blob = system.gateway.get(f"/v1/collections/{COLLECTION}/images/{image_id}/sealed").content
    opaque_id = sealed["uploads"][3]["opaque_id"]
    identity = SealedIdentity(tenant=system.tenant, collection=COLLECTION, image_id=opaque_id)
    opened = open_with_data_key(blob, data_key, identity)
    assert opened.image.tobytes() == sealed["images"][3].tobytes()
    assert opened.metadata == {"label": int(sealed["labels"][3]), "role": "template", "train": True}
    audit = (system.root / "encryptor-audit.jsonl").read_text()
    assert '"mode": "sealed"' in audit or '"mode":"sealed"' in audit


def _swap(system, a: str, b: str) -> None:
    """What a malicious cloud can do: put image B's (genuine) objects under A's id."""
    layout = CollectionLayout(system.tenant, COLLECTION)
    for key_of in (layout.meta, layout.sealed, layout.fisher_vector):
        system.store.put(key_of(a), system.store.get(key_of(b)))


def test_swapped_or_tampered_records_are_refused_before_anything_is_shown(tmp_path):
    images, masks, labels = labelled_set(6, seed=8)
    with EmbeddedSystem(tmp_path, sealed_collections=frozenset({COLLECTION})) as system:
        assert _publish(system, images, masks).status_code == 201
        uploads = [
            _ingest(system, im, m, lab, True)
            for im, m, lab in zip(images, masks, labels, strict=True)
        ]
        a, b = (u["upload"]["image_id"] for u in uploads[:2])
        # A re-push of the same image is idempotent; other pixels under its id are refused.
        again = _ingest(system, images[0], masks[0], labels[0], True)
        assert again["upload"]["image_id"] == a
        encryptor = system.encryptor_app.state.encryptor
        with pytest.raises(GatewayError) as refused:
            encryptor.ingest(
                COLLECTION, images[0] + 1, masks[0], opaque_id=uploads[0]["opaque_id"], label=1
            )
        assert refused.value.status == 409
        layout = CollectionLayout(system.tenant, COLLECTION)
        original = {k: system.store.get(k(a)) for k in (layout.meta, layout.sealed)}
        _swap(system, a, b)
        plain = system.encryptor.get(f"/v1/collections/{COLLECTION}/images/{a}/plain")
        assert plain.status_code == 502 and "another image" in plain.json()["detail"]
        release = system.encryptor.post(
            "/v1/keys/release", json={"collection": COLLECTION, "image_id": a}
        )
        assert release.status_code == 422 and "another image" in release.json()["detail"]
        # A blob moved under A's own record (same opaque id claimed) fails the AEAD's binding.
        system.store.put(layout.meta(a), original[layout.meta])
        plain = system.encryptor.get(f"/v1/collections/{COLLECTION}/images/{a}/plain")
        assert plain.status_code == 502 and "belongs to" in plain.json()["detail"]
        # One flipped byte of A's own blob.
        blob = bytearray(original[layout.sealed])
        blob[-5] ^= 0x10
        system.store.put(layout.sealed(a), bytes(blob))
        plain = system.encryptor.get(f"/v1/collections/{COLLECTION}/images/{a}/plain")
        assert plain.status_code == 502 and "authentication" in plain.json()["detail"]
        system.store.put(layout.sealed(a), original[layout.sealed])
        assert (
            system.encryptor.get(f"/v1/collections/{COLLECTION}/images/{a}/plain").status_code
            == 200
        )


def test_sealed_and_pe_collections_stay_apart(tmp_path):
    images, masks, _ = labelled_set(3, seed=9)
    with EmbeddedSystem(tmp_path, sealed_collections=frozenset({COLLECTION})) as system:
        # A sealed collection without its patch model: nothing is sent.
        answer = system.encryptor.post(
            f"/v1/collections/{COLLECTION}/images",
            files={
                "image": ("i.npy", npy_bytes(images[0])),
                "mask": ("m.npy", npy_bytes(masks[0])),
            },
        )
        assert answer.status_code == 422 and "patch model" in answer.json()["detail"]
        # A pe collection cannot be sealed once it holds pe images, and vice versa.
        assert _pe_upload(system, "brain", images[0], masks[0]).status_code == 202
        model = _publish(system, images[:1], masks[:1], "brain")
        assert model.status_code == 422 and "not sealed" in model.json()["detail"]
        assert _publish(system, images, masks).status_code == 201
        refused = system.gateway.post(
            f"/v1/collections/{COLLECTION}/images",
            files={
                "cipher": ("c.png", encode_png(images[0].astype(np.uint8)), "image/png"),
                "mask": ("m.png", encode_png(masks[0]), "image/png"),
                "metadata": (None, json.dumps(_pe_meta(images[0].shape))),
            },
        )
        assert refused.status_code == 409 and "sealed" in refused.json()["detail"]


def _pe_meta(shape):
    return {
        "opaque_id": "pe-record-0001",
        "height": shape[0],
        "width": shape[1],
        "key": {"counter": 0, "check": "0123456789abcdef"},
    }


def _pe_upload(system, collection, image, mask):
    return system.encryptor.post(
        f"/v1/collections/{collection}/images",
        files={"image": ("i.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
        data={"label": "1", "train": "true"},
    )


def test_the_cloud_id_of_a_sealed_record_follows_from_its_identity(sealed):
    system = sealed["system"]
    for upload in sealed["uploads"][:3]:
        assert upload["upload"]["image_id"] == image_id_for(
            system.tenant, COLLECTION, upload["opaque_id"]
        )
        for part in ("cipher", "mask"):
            answer = system.gateway.get(
                f"/v1/collections/{COLLECTION}/images/{upload['upload']['image_id']}/{part}"
            )
            assert answer.status_code == 404 and "sealed" in answer.json()["detail"]


def test_rotation_rewraps_stored_blobs_without_touching_their_payload(tmp_path):
    from pecbir_encryptor.core import Encryptor
    from pecbir_encryptor.keyring import Keyring
    from pecore.sealing import read_header

    images, masks, labels = labelled_set(4, seed=11)
    old = MasterKey.from_seed(41)
    with EmbeddedSystem(tmp_path, master=old, sealed_collections=frozenset({COLLECTION})) as system:
        assert _publish(system, images, masks).status_code == 201
        uploads = [
            _ingest(system, im, m, lab, True)
            for im, m, lab in zip(images, masks, labels, strict=True)
        ]
        image_id = uploads[0]["upload"]["image_id"]
        layout = CollectionLayout(system.tenant, COLLECTION)
        before = system.store.get(layout.sealed(image_id))
        running = system.encryptor_app.state.encryptor

        def encryptor_with(keyring: Keyring) -> Encryptor:
            return Encryptor(
                keyring,
                running.gateway.http,
                tenant=system.tenant,
                sealed_collections={COLLECTION},
                patch_models=tmp_path / "patch-models",
            )

        new = MasterKey.from_seed(42)
        rotated = encryptor_with(Keyring(new, [old]))
        assert rotated.rewrap(COLLECTION, image_id) == (old.key_id, new.key_id)
        after = system.store.get(layout.sealed(image_id))
        assert read_header(after).wrap.key_id == new.key_id
        # Same payload ciphertext: only the wrap changed (the cloud checks it, too).
        assert after[-1000:] == before[-1000:] and after != before
        opened = encryptor_with(Keyring(new)).fetch_plain(COLLECTION, image_id)
        assert opened.image.tobytes() == images[0].tobytes()
        assert rotated.rewrap(COLLECTION, image_id) == (new.key_id, new.key_id)
        # A blob whose payload differs is no re-wrap: the cloud refuses to replace it.
        other = system.store.get(layout.sealed(uploads[1]["upload"]["image_id"]))
        with pytest.raises(GatewayError) as refused:
            running.gateway.put_sealed(COLLECTION, image_id, other)
        assert refused.value.status == 409
        assert system.store.get(layout.sealed(image_id)) == after
