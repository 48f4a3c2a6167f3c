"""Issue 18 items 3 and 7, issue 12's stable answers, in the pe mode: records bound to their
identity, no key reused for other content, reserved ids and CLI paths refused, the same query
always the same cipher."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest

from pecbir_contracts.layout import CollectionLayout, image_id_for
from pecbir_contracts.png import encode_png
from pecbir_encryptor.core import Encryptor, protect_image
from pecbir_harness.dicom import make_mr
from pecbir_harness.embedded import EmbeddedSystem
from pecore.cipher import to_uint8
from pecore.envelope import image_key_for
from pecore.keys import MasterKey
from tests.services.helpers import SMALL_MODEL, blob_image, labelled_set, npy_bytes


def _upload(system, image, mask, label=1, collection="brain"):
    answer = system.encryptor.post(
        f"/v1/collections/{collection}/images",
        files={"image": ("x.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
        data={"label": str(label), "train": "true"},
    )
    assert answer.status_code == 202, answer.text
    return answer.json()


def _copy(system, source: tuple[str, str], target: tuple[str, str]) -> None:
    """What a malicious cloud can do: store one image's genuine objects under another place."""
    (from_collection, from_id), (to_collection, to_id) = source, target
    src = CollectionLayout(system.tenant, from_collection)
    dst = CollectionLayout(system.tenant, to_collection)
    for name in ("meta", "cipher", "mask"):
        data = system.store.get(getattr(src, name)(from_id))
        system.store.put(getattr(dst, name)(to_id), data)


@pytest.fixture
def two_images(tmp_path):
    with EmbeddedSystem(tmp_path, master=MasterKey.from_seed(31)) as system:
        (a_image, a_mask), (b_image, b_mask) = blob_image(1), blob_image(2)
        a = _upload(system, a_image, a_mask)
        b = _upload(system, b_image, b_mask)
        yield system, a, b, (a_image, b_image)


def test_swapping_a_s_objects_for_b_s_is_refused(two_images):
    system, a, b, (a_image, _) = two_images
    a_id, b_id = a["upload"]["image_id"], b["upload"]["image_id"]
    plain = system.encryptor.get(f"/v1/collections/brain/images/{a_id}/plain?format=npy")
    assert plain.status_code == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(plain.content)), to_uint8(a_image)[0])
    _copy(system, ("brain", b_id), ("brain", a_id))
    plain = system.encryptor.get(f"/v1/collections/brain/images/{a_id}/plain")
    assert plain.status_code == 502 and "another image" in plain.json()["detail"]
    release = system.encryptor.post(
        "/v1/keys/release", json={"collection": "brain", "image_id": a_id}
    )
    assert release.status_code == 422 and "another image" in release.json()["detail"]
    audit = (system.root / "encryptor-audit.jsonl").read_text()
    assert audit.count('"outcome": "refused"') + audit.count('"outcome":"refused"') >= 2


def test_a_record_moved_to_another_collection_is_refused(two_images):
    system, _, b, _ = two_images
    b_id = b["upload"]["image_id"]
    moved_id = image_id_for(system.tenant, "other", b["opaque_id"])
    _copy(system, ("brain", b_id), ("other", moved_id))
    plain = system.encryptor.get(f"/v1/collections/other/images/{moved_id}/plain")
    assert plain.status_code == 502 and "integrity check failed" in plain.json()["detail"]


def test_legacy_v2_records_are_refused_unless_migrating_then_open_with_a_warning(tmp_path, caplog):
    image, mask = blob_image(3)
    with EmbeddedSystem(tmp_path, master=MasterKey.from_seed(32)) as system:
        legacy = protect_image(image, mask, master=system.master, opaque_id="legacy-0001")
        assert legacy.metadata.integrity.version == 2
        stored = system.gateway.post(
            "/v1/collections/brain/images",
            files={
                "cipher": ("c.png", encode_png(legacy.cipher), "image/png"),
                "mask": ("m.png", encode_png(legacy.mask), "image/png"),
                "metadata": (None, legacy.metadata.model_dump_json()),
            },
        )
        assert stored.status_code == 202, stored.text
        image_id = stored.json()["image_id"]
        url = f"/v1/collections/brain/images/{image_id}/plain"
        refused = system.encryptor.get(url)
        assert refused.status_code == 502 and "bound to no tenant" in refused.json()["detail"]
        system.encryptor_app.state.encryptor.accept_unbound_records = True
        with caplog.at_level(logging.WARNING):
            plain = system.encryptor.get(url, params={"format": "npy"})
        assert plain.status_code == 200
        assert np.load(io.BytesIO(plain.content)).tobytes() == to_uint8(image)[0].tobytes()
        assert any("legacy record" in r.getMessage() for r in caplog.records)


# -- issue 18.7: keys ----------------------------------------------------------------------------
def test_other_pixels_under_the_same_uid_never_share_a_key_and_are_refused(tmp_path):
    image, mask = blob_image(4)
    other = image.copy()
    other[10, 10] ^= 1  # one pixel differs
    dataset = make_mr(image.astype(np.uint16))
    with EmbeddedSystem(tmp_path, master=MasterKey.from_seed(33)) as system:
        encryptor = system.encryptor_app.state.encryptor
        first = encryptor.protect(image, mask, opaque_id="same-uid-01", collection="brain")
        second = encryptor.protect(other, mask, opaque_id="same-uid-01", collection="brain")
        assert first.metadata.key.salt != second.metadata.key.salt
        assert first.metadata.key.check != second.metadata.key.check
        # Through the encryptor: a re-push of the same DICOM is idempotent, other pixels under
        # its SOP Instance UID are refused (409) and the first image stays as it was.
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files = {"image": ("i.dcm", buffer.getvalue()), "mask": ("m.npy", npy_bytes(mask))}
        answer = system.encryptor.post("/v1/collections/brain/images", files=files)
        assert answer.status_code == 202, answer.text
        again = system.encryptor.post("/v1/collections/brain/images", files=files)
        assert again.status_code == 202
        assert again.json()["upload"]["image_id"] == answer.json()["upload"]["image_id"]
        dataset.PixelData = other.astype(np.uint16).tobytes()
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files["image"] = ("i.dcm", buffer.getvalue())
        refused = system.encryptor.post("/v1/collections/brain/images", files=files)
        assert refused.status_code == 409, refused.text
        image_id = answer.json()["upload"]["image_id"]
        plain = system.encryptor.get(f"/v1/collections/brain/images/{image_id}/plain?format=npy")
        np.testing.assert_array_equal(np.load(io.BytesIO(plain.content)), to_uint8(image)[0])


def test_one_id_at_two_sizes_gets_unrelated_key_streams():
    master = MasterKey.from_seed(34)
    small, small_mask = blob_image(5, (40, 40))
    large, large_mask = blob_image(5, (48, 48))
    records = [
        protect_image(
            image, mask, master=master, opaque_id="sized-0001", tenant="hosp-a", collection="c"
        ).metadata
        for image, mask in ((small, small_mask), (large, large_mask))
    ]
    streams = [
        image_key_for(
            master, "sized-0001", "per-image", meta.height * meta.width, salt=meta.key.salt
        ).stream()
        for meta in records
    ]
    shared = min(s.size for s in streams)
    assert np.mean(streams[0][:shared] == streams[1][:shared]) < 0.6  # ~0.5: unrelated


def test_reserved_ids_are_refused():
    master = MasterKey.from_seed(35)
    image, mask = blob_image(6)
    for reserved in ("__shared__", "__anything"):
        with pytest.raises(ValueError, match="reserved"):
            protect_image(image, mask, master=master, opaque_id=reserved)


@pytest.mark.parametrize(
    ("image_id", "message"),
    [("__shared__", "--id"), ("../x", "--id"), ("a/b", "--id"), ("/tmp/x", "--id")],
)
def test_pecbir_encrypt_refuses_reserved_and_path_like_ids(tmp_path, capsys, image_id, message):
    from pecbir.cli import main

    key = tmp_path / "owner.key"
    assert main(["keygen", "--out", str(key)]) == 0
    source = tmp_path / "scan.npy"
    np.save(source, blob_image(7)[0])
    out = tmp_path / "out" / "cipher"
    code = main(["encrypt", str(source), "--key", str(key), "--out", str(out), "--id", image_id])
    assert code == 2
    assert message in capsys.readouterr().err
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - {key, source}
    assert not written, written


# -- issue 12: stable answers in the pe mode ------------------------------------------------------
def test_the_same_query_is_the_same_cipher_and_never_a_stored_image_s_key():
    master = MasterKey.from_seed(36)
    encryptor = Encryptor(master, gateway=None, tenant="hosp-a")
    image, mask = blob_image(8)
    ciphers, checks = [], []
    for _ in range(3):
        query_id = encryptor.query_id_for(image, mask)
        query = encryptor.protect(image, mask, opaque_id=query_id, role="query", collection="brain")
        ciphers.append(query.cipher)
        checks.append(query.metadata.key.check)
    assert all(np.array_equal(c, ciphers[0]) for c in ciphers) and len(set(checks)) == 1
    stored = encryptor.protect(
        image, mask, opaque_id=encryptor.opaque_id_for("1.2.3"), collection="brain"
    )
    assert stored.metadata.key.check != checks[0]
    assert encryptor.query_id_for(image, mask) != encryptor.opaque_id_for("1.2.3")
    other_image, other_mask = blob_image(9)
    assert encryptor.query_id_for(other_image, other_mask) != query_id


def test_repeated_pe_queries_rank_identically(tmp_path):
    images, masks, labels = labelled_set(12, seed=6)
    with EmbeddedSystem(tmp_path, master=MasterKey.from_seed(37)) as system:
        for image, mask, label in zip(images, masks, labels, strict=True):
            _upload(system, image, mask, label)
        assert system.gateway.post("/v1/collections/brain/model/train", json=SMALL_MODEL)
        system.wait_searchable("brain", len(images))
        # A stored image goes by reference (test_privacy_that_holds); these queries differ
        # from their stored copy in one pixel, so they travel as ciphers under their own key.
        for i in (0, 5):
            query = images[i].copy()
            query[0, 0] ^= 1
            answers = []
            for _ in range(4):
                found = system.encryptor.post(
                    "/v1/collections/brain/search",
                    files={
                        "image": ("q.npy", npy_bytes(query)),
                        "mask": ("m.npy", npy_bytes(masks[i])),
                    },
                    data={"k": "12"},
                )
                assert found.status_code == 200, found.text
                answers.append([(h["image_id"], h["distance"]) for h in found.json()["hits"]])
            assert all(answer == answers[0] for answer in answers)
