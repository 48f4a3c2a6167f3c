"""The services wired in one process (embedded mode): upload → train → index → search → decrypt."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from pecbir_contracts.layout import CollectionLayout
from pecbir_harness.dicom import make_mr
from pecbir_harness.embedded import EmbeddedSystem
from pecore.cipher import to_uint8
from pecore.keys import MasterKey
from tests.services.helpers import (
    SMALL_MODEL,
    dicom_bytes,
    labelled_set,
    make_seg,
    multipart_related,
    npy_bytes,
)


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with EmbeddedSystem(tmp_path_factory.mktemp("embedded"), master=MasterKey.from_seed(7)) as s:
        yield s


@pytest.fixture(scope="module")
def loaded(system):
    """18 labelled templates uploaded through the encryptor, a model trained and indexed."""
    images, masks, labels = labelled_set(18)
    uploads = []
    for image, mask, label in zip(images, masks, labels, strict=True):
        answer = system.encryptor.post(
            "/v1/collections/brain/images",
            files={"image": ("x.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
            data={"label": str(label), "train": "true"},
        )
        assert answer.status_code == 202, answer.text
        uploads.append(answer.json())
    trained = system.gateway.post("/v1/collections/brain/model/train", json=SMALL_MODEL)
    assert trained.status_code == 202, trained.text
    state = system.gateway.get(trained.json()["status_url"]).json()
    assert state["state"] == "trained", state
    system.wait_searchable("brain", len(images))
    return images, masks, labels, uploads


def test_everything_uploaded_is_searchable_and_the_cloud_holds_only_ciphertext(system, loaded):
    images, _, _, uploads = loaded
    for upload in uploads:
        status = system.gateway.get(upload["upload"]["status_url"]).json()
        assert status["state"] == "searchable", status
    layout = CollectionLayout(system.tenant, "brain")
    image_id = uploads[0]["upload"]["image_id"]
    stored = system.store.get(layout.cipher(image_id))
    from pecbir_contracts.png import decode_image_png

    plain, _ = to_uint8(images[0])
    assert not np.array_equal(decode_image_png(stored), plain)
    meta = json.loads(system.store.get(layout.meta(image_id)))
    assert set(meta) == {
        "opaque_id",
        "role",
        "label",
        "height",
        "width",
        "rescale",
        "key",
        "integrity",
    }


def test_search_through_the_encryptor_decrypts_bit_exactly(system, loaded):
    images, masks, _, uploads = loaded
    answer = system.encryptor.post(
        "/v1/collections/brain/search",
        files={"image": ("q.npy", npy_bytes(images[3])), "mask": ("m.npy", npy_bytes(masks[3]))},
        data={"k": "5"},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["n_database"] == len(images) and len(body["hits"]) == 5
    distances = [hit["distance"] for hit in body["hits"]]
    assert distances == sorted(distances)
    by_id = {u["upload"]["image_id"]: i for i, u in enumerate(uploads)}
    assert {hit["image_id"] for hit in body["hits"]} <= set(by_id)
    for hit in body["hits"]:
        plain = system.encryptor.get(hit["plain_url"], params={"format": "npy"})
        assert plain.status_code == 200, plain.text
        expected, _ = to_uint8(images[by_id[hit["image_id"]]])
        np.testing.assert_array_equal(np.load(io.BytesIO(plain.content)), expected)


def test_tampered_objects_are_refused_not_decrypted(system, loaded):
    _, _, _, uploads = loaded
    layout = CollectionLayout(system.tenant, "brain")
    image_id = uploads[1]["upload"]["image_id"]
    url = f"/v1/collections/brain/images/{image_id}/plain"
    assert system.encryptor.get(url).status_code == 200
    for key, change in [
        (layout.meta(image_id), lambda b: b.replace(b'"label":2', b'"label":1')),
        (layout.mask(image_id), None),
        (layout.cipher(image_id), None),
    ]:
        original = system.store.get(key)
        if change is None:
            from pecbir_contracts.png import decode_image_png, decode_mask_png, encode_png

            if key.endswith("mask.png"):
                array = decode_mask_png(original).copy()
                array[0, 0] = ~array[0, 0]
            else:
                array = decode_image_png(original).copy()
                array[5, 5] ^= 1
            tampered = encode_png(array)
        else:
            tampered = change(original)
        assert tampered != original
        system.store.put(key, tampered)
        try:
            answer = system.encryptor.get(url)
            assert answer.status_code == 502, (key, answer.text)
            assert "integrity" in answer.json()["detail"]
        finally:
            system.store.put(key, original)
    assert system.encryptor.get(url).status_code == 200


def test_key_release_is_authorised_and_audited(system, loaded):
    _, _, _, uploads = loaded
    image_id = uploads[2]["upload"]["image_id"]
    body = {"collection": "brain", "image_id": image_id}
    denied = system.encryptor.post(
        "/v1/keys/release",
        json=body,
        headers={"authorization": f"Bearer {system.user_token(scopes=('search',))}"},
    )
    assert denied.status_code == 403
    released = system.encryptor.post("/v1/keys/release", json=body)
    assert released.status_code == 200, released.text
    key = released.json()["key"]
    assert key["image_id"] == uploads[2]["opaque_id"] and "sslm" in key
    audit = [
        json.loads(line)
        for line in (system.root / "encryptor-audit.jsonl").read_text().splitlines()
    ]
    outcomes = [(r["action"], r["outcome"]) for r in audit if r["action"] == "key-release"]
    assert outcomes[-2:] == [("key-release", "denied"), ("key-release", "released")]
    assert oct((system.root / "encryptor-audit.jsonl").stat().st_mode & 0o777) == "0o600"


def test_ingest_refuses_images_without_a_usable_mask(system):
    images, masks, _ = labelled_set(1)
    files = {"image": ("x.npy", npy_bytes(images[0]))}
    missing = system.encryptor.post("/v1/collections/brain/images", files=files)
    assert missing.status_code == 422
    empty = system.encryptor.post(
        "/v1/collections/brain/images",
        files=files | {"mask": ("m.npy", npy_bytes(np.zeros_like(masks[0])))},
    )
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]


def test_stow_rs_stores_images_with_seg_and_reports_failures(system, loaded):
    images, masks, _, _ = loaded
    with_mask = make_mr(images[0].astype(np.uint16), bits_stored=12)
    without_mask = make_mr(images[1].astype(np.uint16), bits_stored=12)
    seg = make_seg(masks[0], with_mask, label="meningioma")
    body, content_type = multipart_related(
        [dicom_bytes(with_mask), dicom_bytes(without_mask), dicom_bytes(seg)]
    )
    answer = system.encryptor.post(
        "/dicomweb/brain/studies", content=body, headers={"content-type": content_type}
    )
    # The image without a SEG is stored at the hospital with a warning, not refused.
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    response = answer.json()
    stored = {i["00081155"]["Value"][0]: i for i in response["00081199"]["Value"]}
    assert set(stored) == {
        with_mask.SOPInstanceUID,
        seg.SOPInstanceUID,
        without_mask.SOPInstanceUID,
    }
    assert "00081198" not in response
    waiting = stored[without_mask.SOPInstanceUID]
    assert waiting["00081196"]["Value"] == [0xB000] and "00081190" not in waiting
    assert "SEG" in waiting["00000902"]["Value"][0]
    assert "00081196" not in stored[with_mask.SOPInstanceUID]
    # Same push again: idempotent (same opaque id, same cloud object).
    again = system.encryptor.post(
        "/dicomweb/brain/studies", content=body, headers={"content-type": content_type}
    )
    assert again.json()["00081199"] == response["00081199"]
    # Nothing from the DICOM header reached the cloud.
    everything = b"".join(system.store.get(k) for k in system.store.list("tenants/"))
    for value in ("Doe^Jane", "PID-0001", "Test Hospital", with_mask.SOPInstanceUID,
                  with_mask.StudyInstanceUID):  # fmt: skip
        assert value.encode() not in everything
    nothing, ct = multipart_related([b"not dicom"])
    none = system.encryptor.post(
        "/dicomweb/brain/studies", content=nothing, headers={"content-type": ct}
    )
    assert none.status_code == 409
    wrong_type = system.encryptor.post(
        "/dicomweb/brain/studies", content=body, headers={"content-type": "application/dicom"}
    )
    assert wrong_type.status_code == 415
