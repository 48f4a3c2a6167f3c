"""Issue 12, the closing gaps (embedded system, real code paths):

* a query pixel-identical to a stored image of the searcher's own hospital goes by reference
  (the cloud receives no second cipher of it) and ranks the image itself first;
* labels reach the cloud only for images marked as templates (default: not a template; a
  per-collection policy for pipelines that cannot mark them, e.g. a PACS push);
* an owner's signed protection record, checked by its peers against their trust list: a cloud
  that lies about a collection's mode or patch model is refused;
* re-wrap of many sealed blobs after a rotation, with per-image results;
* a re-push of an image after a rotation is answered like the first time (no 409).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pecbir_contracts.layout import CollectionLayout, image_id_for
from pecbir_contracts.records import FeatureRecord
from pecbir_encryptor import cli
from pecbir_encryptor.core import Encryptor
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_encryptor.keyring import Keyring
from pecbir_encryptor.protection import UntrustedProtection
from pecbir_harness.embedded import EmbeddedSystem
from pecore.cipher import to_uint8
from pecore.keys import MasterKey
from tests.services.helpers import SMALL_MODEL, labelled_set, npy_bytes

SHAPE = (128, 128)
PATCH_MODEL = {"n_components": "4", "n_regions": "2", "patch_size": "5", "radius": "2"}


def _ingest(client, collection, image, mask, label, train: bool | None):
    data = {"label": str(label)}
    if train is not None:
        data["train"] = "true" if train else "false"
    answer = client.post(
        f"/v1/collections/{collection}/images",
        files={"image": ("i.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
        data=data,
    )
    assert answer.status_code == 202, answer.text
    return answer.json()


def _search(client, collection, image, mask, k=10, owner=None):
    answer = client.post(
        f"/v1/collections/{collection}/search",
        params={"owner": owner} if owner else {},
        files={"image": ("q.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
        data={"k": str(k)},
    )
    return answer


class Sent:
    """What the encryptor sent to the gateway (method, path): the hospital's outgoing wire."""

    def __init__(self, system: EmbeddedSystem) -> None:
        self.requests: list[tuple[str, str]] = []
        http = system.encryptor_app.state.encryptor.gateway.http
        http.event_hooks["request"].append(self._keep)

    def _keep(self, request) -> None:
        self.requests.append((request.method, request.url.path))

    def clear(self) -> None:
        self.requests.clear()


def _train(system, collection, n, tenant=None):
    headers = {"authorization": f"Bearer {system.cloud_token(tenant=tenant)}"} if tenant else {}
    trained = system.gateway.post(
        f"/v1/collections/{collection}/model/train", json=SMALL_MODEL, headers=headers
    )
    assert trained.status_code == 202, trained.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = system.gateway.get(f"/v1/collections/{collection}/model", headers=headers).json()
        if status["serving_version"] and status["n_vectors"] >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(status)


# -- 1. a query of a stored image goes by reference ---------------------------------------------
@pytest.mark.parametrize("mode", ["pe", "pe-roi"])
def test_a_query_of_a_stored_image_sends_no_cipher_and_ranks_itself_first(tmp_path, mode):
    collection = "brain" if mode == "pe" else "roi-brain"
    roi = frozenset({collection}) if mode == "pe-roi" else frozenset()
    images, masks, labels = labelled_set(12, shape=SHAPE, seed=4)
    with EmbeddedSystem(tmp_path, master=MasterKey.from_seed(61), pe_roi_collections=roi) as system:
        ids = [
            _ingest(system.encryptor, collection, im, m, lab, True)["upload"]["image_id"]
            for im, m, lab in zip(images, masks, labels, strict=True)
        ]
        _train(system, collection, len(ids))
        sent = Sent(system)
        before = set(system.store.list(""))
        own = f"/v1/collections/{collection}/images/{ids[3]}/search"
        rankings = []
        for _ in range(3):
            answer = _search(system.encryptor, collection, images[3], masks[3], k=12)
            assert answer.status_code == 200, answer.text
            rankings.append([(h["image_id"], h["distance"]) for h in answer.json()["hits"]])
        assert all(r == rankings[0] for r in rankings)
        assert rankings[0][0] == (ids[3], 0.0)
        # Nothing but the reference went out, and the cloud stored nothing new.
        assert {path for _, path in sent.requests} == {own}, sent.requests
        assert set(system.store.list("")) == before
        if mode == "pe":
            # The radiologist's "stored study" query is the image as it opens (8-bit): also
            # by reference.
            opened = system.encryptor_app.state.encryptor.fetch_plain(collection, ids[3])
            np.testing.assert_array_equal(opened.image, to_uint8(images[3])[0])
            sent.clear()
            answer = _search(system.encryptor, collection, opened.image, opened.mask, k=12)
            assert answer.status_code == 200, answer.text
            assert [(h["image_id"], h["distance"]) for h in answer.json()["hits"]] == rankings[0]
            assert {path for _, path in sent.requests} == {own}
        # Another image (one pixel differs) goes the normal way, as a cipher.
        sent.clear()
        other = images[3].copy()
        other[0, 0] ^= 1
        answer = _search(system.encryptor, collection, other, masks[3], k=12)
        assert answer.status_code == 200, answer.text
        # pe-roi: the encryptor first asks which scheme the collection's images are under
        asked = [f"/v1/collections/{collection}/protection"] if mode == "pe-roi" else []
        assert [path for _, path in sent.requests] == [
            *asked,
            f"/v1/collections/{collection}/search",
        ]


def test_the_gateway_searches_by_reference_only_in_the_caller_s_own_collection(tmp_path):
    images, masks, labels = labelled_set(6, shape=(48, 48), seed=5)
    with EmbeddedSystem(
        tmp_path, master=MasterKey.from_seed(62), shared_collections="hospital-a/brain=hospital-b"
    ) as system:
        ids = [
            _ingest(system.encryptor, "brain", im, m, lab, True)["upload"]["image_id"]
            for im, m, lab in zip(images, masks, labels, strict=True)
        ]
        path = f"/v1/collections/brain/images/{ids[0]}/search"
        # stored, not yet indexed (no model): 409 with the reason
        answer = system.gateway.post(path, data={"k": "3"})
        assert answer.status_code == 409 and "indexed" in answer.json()["detail"]
        _train(system, "brain", len(ids))
        answer = system.gateway.post(path, data={"k": "3"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["hits"][0]["image_id"] == ids[0]
        missing = system.gateway.post(f"/v1/collections/brain/images/{'ab' * 16}/search")
        assert missing.status_code == 404 and "no image" in missing.json()["detail"]
        bad = system.gateway.post("/v1/collections/brain/images/not-an-id/search")
        assert bad.status_code == 422
        # Another tenant, even one the collection is shared with, has no such image of its own.
        other = {"authorization": f"Bearer {system.cloud_token(tenant='hospital-b')}"}
        refused = system.gateway.post(path, headers=other)
        assert refused.status_code == 404 and "no image" in refused.json()["detail"]
        with_owner = system.gateway.post(path, params={"owner": "hospital-a"}, headers=other)
        assert with_owner.status_code == 404


# -- 2. labels only where needed ----------------------------------------------------------------
def test_labels_reach_the_cloud_only_for_marked_templates_or_by_collection_policy(tmp_path):
    images, masks, labels = labelled_set(9, shape=(48, 48), seed=7)
    with EmbeddedSystem(
        tmp_path, master=MasterKey.from_seed(63), template_collections=frozenset({"pacs"})
    ) as system:
        cases = {  # (collection, train as sent) -> label the cloud may read
            ("brain", None): False,
            ("brain", False): False,
            ("brain", True): True,
            ("pacs", None): True,
            ("pacs", False): False,
        }
        for i, ((collection, train), readable) in enumerate(cases.items()):
            upload = _ingest(system.encryptor, collection, images[i], masks[i], labels[i], train)
            layout = CollectionLayout(system.tenant, collection)
            meta = json.loads(system.store.get(layout.meta(upload["upload"]["image_id"])))
            assert meta["label"] == (int(labels[i]) if readable else None), (collection, train)
            # the label is still known at the hospital (its own upload record)
            record = system.encryptor_app.state.encryptor.audit.read(actions={"upload"})[-1]
            assert record["label"] == int(labels[i]) and record["train"] is readable


def test_a_sealed_default_upload_keeps_its_label_inside_the_blob(tmp_path):
    images, masks, labels = labelled_set(4, shape=(48, 48), seed=8)
    with EmbeddedSystem(
        tmp_path, master=MasterKey.from_seed(64), sealed_collections=frozenset({"sealed"})
    ) as system:
        published = system.encryptor.post(
            "/v1/collections/sealed/patch-model",
            files=[("images", (f"{i}.npy", npy_bytes(im))) for i, im in enumerate(images)]
            + [("masks", (f"{i}.npy", npy_bytes(m))) for i, m in enumerate(masks)],
            data=PATCH_MODEL,
        )
        assert published.status_code == 201, published.text
        upload = _ingest(system.encryptor, "sealed", images[0], masks[0], labels[0], None)
        image_id = upload["upload"]["image_id"]
        layout = CollectionLayout(system.tenant, "sealed")
        assert json.loads(system.store.get(layout.meta(image_id)))["label"] is None
        plain = system.encryptor.get(f"/v1/collections/sealed/images/{image_id}/plain")
        assert plain.headers["X-Pecbir-Label"] == str(labels[0])


# -- 3. the owner's signed protection record ----------------------------------------------------
@pytest.fixture
def shared_sealed(tmp_path):
    """hospital-b owns a sealed collection shared with hospital-a (this system's tenant)."""
    images, masks, labels = labelled_set(9, shape=(48, 48), seed=9)
    with EmbeddedSystem(
        tmp_path,
        master=MasterKey.from_seed(65),
        shared_collections="hospital-b/shared=hospital-a",
    ) as system:
        b = system.add_hospital(
            "hospital-b", master=MasterKey.from_seed(66), sealed_collections=frozenset({"shared"})
        )
        published = b.encryptor.post(
            "/v1/collections/shared/patch-model",
            files=[("images", (f"{i}.npy", npy_bytes(im))) for i, im in enumerate(images)]
            + [("masks", (f"{i}.npy", npy_bytes(m))) for i, m in enumerate(masks)],
            data=PATCH_MODEL,
        )
        assert published.status_code == 201, published.text
        for image, mask, label in zip(images, masks, labels, strict=True):
            _ingest(b.encryptor, "shared", image, mask, label, True)
        _train(system, "shared", len(images), tenant="hospital-b")
        yield system, b, images, masks


def test_a_peer_searches_a_collection_whose_signed_record_checks_out(shared_sealed):
    system, _, images, masks = shared_sealed
    answer = _search(system.encryptor, "shared", images[0], masks[0], k=3, owner="hospital-b")
    assert answer.status_code == 200, answer.text
    held = system.gateway.get("/v1/collections/shared/protection", params={"owner": "hospital-b"})
    record = held.json()["signed"]["record"]
    assert record["mode"] == "sealed" and len(record["patch_model"]) == 64


def _lie(system, mutate) -> None:
    layout = CollectionLayout("hospital-b", "shared")
    signed = json.loads(system.store.get(layout.signed_protection))
    mutate(signed, layout)
    if signed is not None:
        system.store.put(layout.signed_protection, json.dumps(signed).encode())


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        ("mode in the record", "not signed by"),
        ("no record", "no protection record"),
        ("the collection is pe", "the cloud says"),
        ("another patch model", "not the one its owner signed"),
        ("another owner's key", "not signed by"),
        ("untrusted owner", "no public key"),
    ],
)
def test_a_peer_refuses_a_cloud_that_lies_about_the_protection(shared_sealed, lie, message):
    system, b, images, masks = shared_sealed
    layout = CollectionLayout("hospital-b", "shared")
    encryptor = system.encryptor_app.state.encryptor
    if lie == "mode in the record":
        _lie(system, lambda s, _: s["record"].update(mode="pe", patch_model=None))
    elif lie == "no record":
        system.store.delete(layout.signed_protection)
    elif lie == "the collection is pe":
        system.store.delete(layout.patch_model)  # the cloud now answers "pe"
    elif lie == "another patch model":
        other = system.store.get(layout.patch_model) + b"\x00"
        system.store.put(layout.patch_model, other)
    elif lie == "another owner's key":
        # hospital-a's list names a key that is not hospital-b's (its own, as b lists it)
        encryptor.trusted_owners["hospital-b"] = b.encryptor_app.state.encryptor.trusted_owners[
            "hospital-a"
        ]
    else:
        del encryptor.trusted_owners["hospital-b"]
    sent = Sent(system)
    answer = _search(system.encryptor, "shared", images[0], masks[0], k=3, owner="hospital-b")
    assert answer.status_code == 502, answer.text
    assert message in answer.json()["detail"]
    # Nothing of the query went out: only the question of the collection's protection (and,
    # for the swapped model, the model itself).
    assert all("/search" not in path for _, path in sent.requests), sent.requests
    with pytest.raises(UntrustedProtection):
        encryptor.search("shared", images[0], masks[0], 3, "hospital-b")


def test_the_cloud_refuses_a_protection_record_that_is_not_the_collection_s(shared_sealed):
    system, b, _, _ = shared_sealed
    owner = b.encryptor_app.state.encryptor
    from pecbir_encryptor.protection import sign_protection

    record = owner.protection_record("shared")
    headers = {"authorization": f"Bearer {system.cloud_token(tenant='hospital-b')}"}
    for change, status in (
        ({"mode": "pe", "patch_model": None}, 409),
        ({"patch_model": "0" * 64}, 409),
        ({"tenant": "hospital-a"}, 422),
    ):
        signed = sign_protection(owner.signing_key, record.model_copy(update=change))
        answer = system.gateway.put(
            "/v1/collections/shared/protection",
            content=signed.model_dump_json(),
            headers={**headers, "content-type": "application/json"},
        )
        assert answer.status_code == status, (change, answer.text)


# -- 4 + 5. rotation: batch re-wrap, and a re-push answered like the first time ----------------
def _rotated(system, old: MasterKey, new: MasterKey, **kw) -> Encryptor:
    running = system.encryptor_app.state.encryptor
    return Encryptor(
        Keyring(new, [old]),
        running.gateway.http,
        tenant=system.tenant,
        audit_log=running.audit.path,
        patch_models=system.root / "patch-models",
        **kw,
    )


def test_rewrap_many_rewraps_every_recorded_sealed_upload_with_per_image_results(
    tmp_path, monkeypatch, capsys
):
    images, masks, labels = labelled_set(5, shape=(48, 48), seed=10)
    old, new = MasterKey.from_seed(67), MasterKey.from_seed(68)
    with EmbeddedSystem(tmp_path, master=old, sealed_collections=frozenset({"sealed"})) as system:
        published = system.encryptor.post(
            "/v1/collections/sealed/patch-model",
            files=[("images", (f"{i}.npy", npy_bytes(im))) for i, im in enumerate(images)]
            + [("masks", (f"{i}.npy", npy_bytes(m))) for i, m in enumerate(masks)],
            data=PATCH_MODEL,
        )
        assert published.status_code == 201, published.text
        ids = [
            _ingest(system.encryptor, "sealed", im, m, lab, True)["upload"]["image_id"]
            for im, m, lab in zip(images, masks, labels, strict=True)
        ]
        rotated = _rotated(system, old, new, sealed_collections={"sealed"})
        assert rotated.sealed_uploads("sealed") == ids
        missing = "cd" * 16
        results = rotated.rewrap_many("sealed", [*ids[:2], missing, *ids[2:]], workers=3)
        assert [r.image_id for r in results] == [*ids[:2], missing, *ids[2:]]
        assert [r.state for r in results] == ["rewrapped"] * 2 + ["failed"] + ["rewrapped"] * 3
        assert "404" in results[2].reason
        # The CLI: every recorded upload, progress per image, a summary; all current now.
        monkeypatch.setattr(cli, "_encryptor", lambda: rotated)
        assert cli.main(["rewrap", "--collection", "sealed", "--workers", "2"]) == 0
        out = capsys.readouterr().out
        assert f"[{len(ids)}/{len(ids)} " in out
        assert f"{len(ids)} images: 0 re-wrapped, {len(ids)} already current, 0 failed" in out
        assert cli.main(["rewrap", "--collection", "sealed", missing]) == 1
        for image_id, image in zip(ids, images, strict=True):
            opened = _rotated(system, new, new).fetch_plain("sealed", image_id)
            assert opened.image.tobytes() == image.tobytes()


@pytest.mark.parametrize("mode", ["pe", "sealed", "pe-roi"])
def test_a_re_push_after_rotation_is_answered_like_the_first_time(tmp_path, mode):
    collection = {"pe": "brain", "sealed": "sealed", "pe-roi": "roi"}[mode]
    kw = {
        "sealed_collections": frozenset({collection}) if mode == "sealed" else frozenset(),
        "pe_roi_collections": frozenset({collection}) if mode == "pe-roi" else frozenset(),
    }
    images, masks, _ = labelled_set(3, shape=SHAPE, seed=11)
    old, new = MasterKey.from_seed(69), MasterKey.from_seed(70)
    with EmbeddedSystem(tmp_path, master=old, **kw) as system:
        if mode == "sealed":
            published = system.encryptor.post(
                f"/v1/collections/{collection}/patch-model",
                files=[("images", (f"{i}.npy", npy_bytes(im))) for i, im in enumerate(images)]
                + [("masks", (f"{i}.npy", npy_bytes(m))) for i, m in enumerate(masks)],
                data=PATCH_MODEL,
            )
            assert published.status_code == 201, published.text
        running = system.encryptor_app.state.encryptor
        opaque_id = running.opaque_id_for("1.2.840.99.1")
        first = running.ingest(collection, images[0], masks[0], opaque_id=opaque_id, label=1)
        assert first["image_id"] == image_id_for(system.tenant, collection, opaque_id)
        layout = CollectionLayout(system.tenant, collection)
        stored = {
            k: system.store.get(k)
            for k in system.store.list(layout.image_prefix(first["image_id"]))
        }
        sent = Sent(system)
        uploads = {
            f"/v1/collections/{collection}/images",
            f"/v1/collections/{collection}/sealed-images",
        }
        # With the hospital's content index (the encryptor restarted with the new key): the
        # image is known, nothing is sent again. Without it (an image stored before the index
        # existed): the cloud's 409 is checked against the stored record, opened with the
        # retired key.
        for index in (system.root / "content-index", None):
            sent.clear()
            rotated = _rotated(
                system,
                old,
                new,
                sealed_collections=kw["sealed_collections"],
                pe_roi_collections=kw["pe_roi_collections"],
                content_index=index,
            )
            again = rotated.ingest(collection, images[0], masks[0], opaque_id=opaque_id, label=1)
            assert again == first
            posted = {path for method, path in sent.requests if method == "POST"}
            assert not posted & uploads if index else posted & uploads
            # the cloud's objects are the first upload's, untouched
            assert {k: system.store.get(k) for k in stored} == stored
        # other pixels under the same id are still refused
        with pytest.raises(GatewayError) as refused:
            rotated.ingest(collection, images[1], masks[1], opaque_id=opaque_id, label=1)
        assert refused.value.status == 409
        # so is the same image under its id with a label the cloud did not read before
        marked = _rotated(
            system,
            old,
            new,
            sealed_collections=kw["sealed_collections"],
            pe_roi_collections=kw["pe_roi_collections"],
            content_index=system.root / "content-index",
        )
        with pytest.raises(GatewayError) as relabelled:
            marked.ingest(collection, images[0], masks[0], opaque_id=opaque_id, label=1, train=True)
        assert relabelled.value.status == 409


def test_no_label_of_a_non_template_reaches_store_features_or_search(tmp_path):
    """pe mode, the new default: images uploaded without marking are not templates; after a
    full run (upload, training, indexing, search) no stored object names their labels."""
    images, masks, labels = labelled_set(12, shape=(48, 48), seed=12)
    with EmbeddedSystem(tmp_path, master=MasterKey.from_seed(71)) as system:
        n_train = 9
        ids = [
            _ingest(system.encryptor, "brain", im, m, lab, True if i < n_train else None)["upload"][
                "image_id"
            ]
            for i, (im, m, lab) in enumerate(zip(images, masks, labels, strict=True))
        ]
        _train(system, "brain", len(ids))
        answer = _search(system.encryptor, "brain", images[0], masks[0], k=12)
        assert answer.status_code == 200
        layout = CollectionLayout(system.tenant, "brain")
        by_id = {h["image_id"]: h["label"] for h in answer.json()["hits"]}
        version = system.gateway.get("/v1/collections/brain/model").json()["serving_version"]
        for i, image_id in enumerate(ids):
            expected = int(labels[i]) if i < n_train else None
            assert json.loads(system.store.get(layout.meta(image_id)))["label"] == expected
            record = FeatureRecord.from_bytes(system.store.get(layout.features(version, image_id)))
            assert record.label == expected
            assert by_id[image_id] == expected
        manifest = json.loads(system.store.get(layout.manifest(version)))
        assert sum(manifest["label_counts"].values()) == n_train


def test_the_signing_key_file_is_private_never_overwritten_and_checked(tmp_path, capsys):
    from pecbir_encryptor.protection import load_signing_key, public_key_b64

    path = tmp_path / "signing.key"
    assert cli.main(["signing-key", "--out", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    printed = capsys.readouterr().out
    assert public_key_b64(load_signing_key(path)) in printed
    before = path.read_bytes()
    assert cli.main(["signing-key", "--out", str(path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before
    bad = tmp_path / "bad.key"
    bad.write_text("not base64!\n")
    with pytest.raises(ValueError, match=r"bad\.key"):
        load_signing_key(bad)
    short = tmp_path / "short.key"
    short.write_text("AAAA\n")
    with pytest.raises(ValueError, match="32 bytes"):
        load_signing_key(short)
