"""The pe-roi protection mode end to end (embedded system): the image reaches the cloud only
sealed; the cloud extracts features from a scrambled ROI-only cipher and sees only the
scrambled ROI as mask; search works; hits open bit-exactly at the hospital from the sealed
envelope; tampering is refused; and no pixel outside ROI ⊕ margin is in the cloud's store."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest

from pecbir_contracts.layout import CollectionLayout, image_id_for
from pecbir_contracts.png import decode_image_png, decode_mask_png, encode_png
from pecbir_encryptor.integrity import IntegrityError
from pecbir_harness.embedded import EmbeddedSystem
from pecore.cipher import to_uint8
from pecore.cipher_roi import RoiCipher
from pecore.envelope import image_key_for
from pecore.keys import MasterKey
from pecore.roi import dilate_mask
from pecore.sealing import SealedIdentity, open_with_data_key
from tests.services.helpers import SMALL_MODEL, labelled_set, npy_bytes

COLLECTION = "roi-brain"
N_IMAGES, N_TRAIN = 18, 12
# 128 × 128 with a tumour of radius ~26 px: ROI (24 px) and margin (4 px) leave the corners out.
SHAPE = (128, 128)
MASTER_SEED = 23


def _ingest(system, image, mask, label, train, collection=COLLECTION):
    return system.encryptor.post(
        f"/v1/collections/{collection}/images",
        files={"image": ("i.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
        data={"label": str(label), "train": "true" if train else "false"},
    )


def _search(system, image, mask, k=10):
    answer = system.encryptor.post(
        f"/v1/collections/{COLLECTION}/search",
        files={"image": ("q.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
        data={"k": str(k)},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def _plain(system, image_id):
    return system.encryptor.get(
        f"/v1/collections/{COLLECTION}/images/{image_id}/plain", params={"format": "npy"}
    )


@pytest.fixture(scope="module")
def roi_run(tmp_path_factory):
    """A full pe-roi run: uploads, training, search, decryption."""
    root = tmp_path_factory.mktemp("pe-roi")
    with EmbeddedSystem(
        root, master=MasterKey.from_seed(MASTER_SEED), pe_roi_collections=frozenset({COLLECTION})
    ) as system:
        images, masks, labels = labelled_set(N_IMAGES, shape=SHAPE, seed=6)
        uploads = []
        for i, (image, mask, label) in enumerate(zip(images, masks, labels, strict=True)):
            answer = _ingest(system, image, mask, label, train=i < N_TRAIN)
            assert answer.status_code == 202, answer.text
            uploads.append(answer.json())
        trained = system.gateway.post(f"/v1/collections/{COLLECTION}/model/train", json=SMALL_MODEL)
        assert trained.status_code == 202, trained.text
        system.wait_searchable(COLLECTION, N_IMAGES)
        yield {
            "system": system,
            "images": images,
            "masks": masks,
            "labels": labels,
            "uploads": uploads,
        }


def _image_id(run, i):
    return run["uploads"][i]["upload"]["image_id"]


def test_hits_open_bit_exactly_from_the_sealed_envelope(roi_run):
    system = roi_run["system"]
    hits = _search(system, roi_run["images"][N_TRAIN], roi_run["masks"][N_TRAIN], k=3)["hits"]
    assert hits and all(system.encryptor.get(h["plain_url"]).status_code == 200 for h in hits)
    for i in (0, N_TRAIN, N_IMAGES - 1):
        answer = _plain(system, _image_id(roi_run, i))
        assert answer.status_code == 200, answer.text
        plain = np.load(io.BytesIO(answer.content), allow_pickle=False)
        # the image as the owner held it (12-bit-like uint16), not the 8-bit ROI
        assert plain.dtype == roi_run["images"][i].dtype
        assert plain.tobytes() == roi_run["images"][i].tobytes()
        assert answer.headers["X-Pecbir-Label"] == str(roi_run["labels"][i])


def test_a_query_under_another_pe_roi_scheme_than_the_collection_s_is_refused(roi_run):
    """An encryptor whose pe-roi scheme is not the one the collection's images were stored
    under (an upgrade that changed the default) refuses to search it, naming both."""
    system = roi_run["system"]
    core = system.encryptor_app.state.encryptor
    held = core.pe_roi_scheme
    other = "pe-roi-t16dn" if held != "pe-roi-t16dn" else "pe-roi-t16dn-in"
    # not a stored image (those are answered from their stored features, no query is made)
    query = np.array(roi_run["images"][N_TRAIN], copy=True)
    query[0, 0] += 1
    mask = roi_run["masks"][N_TRAIN]
    core.pe_roi_scheme = other
    try:
        answer = system.encryptor.post(
            f"/v1/collections/{COLLECTION}/search",
            files={"image": ("q.npy", npy_bytes(query)), "mask": ("m.npy", npy_bytes(mask))},
            data={"k": "3"},
        )
    finally:
        core.pe_roi_scheme = held
    assert answer.status_code == 422, answer.text
    assert held in answer.text and other in answer.text
    assert _search(system, query, mask, k=3)["hits"]


def test_search_ranks_the_query_s_class_first_and_is_stable(roi_run):
    """A query that is not a stored image (one corner pixel changed, outside ROI and margin) is
    scrambled under its own key, not its stored copy's: its copy is one more image of its
    class (CFML dim 2 collapses a class), so the class decides the ranking. (A query that is
    exactly a stored image goes by reference: `test_privacy_that_holds`.)"""
    system = roi_run["system"]
    ids = [_image_id(roi_run, j) for j in range(N_IMAGES)]
    per_class = N_IMAGES // 3
    for i in (0, 7, N_TRAIN + 2):
        query = roi_run["images"][i].copy()
        query[0, 0] ^= 1
        answers = [_search(system, query, roi_run["masks"][i]) for _ in range(2)]
        rankings = [[hit["image_id"] for hit in a["hits"]] for a in answers]
        assert rankings[0] == rankings[1]
        first = rankings[0][:per_class]
        assert ids[i] in first
        assert [roi_run["labels"][ids.index(h)] for h in first] == [
            roi_run["labels"][i]
        ] * per_class


def test_the_model_reads_the_owner_s_roi_undilated(roi_run):
    system = roi_run["system"]
    layout = CollectionLayout(system.tenant, COLLECTION)
    keys = system.store.list(layout.models_prefix)
    manifest = json.loads(system.store.get(next(k for k in keys if k.endswith("manifest.json"))))
    assert manifest["params"]["radius"] == 0 and manifest["n_templates"] == N_TRAIN
    assert json.loads(system.store.get(layout.pe_roi)) == {"scheme": RoiCipher().legacy_name}


def test_the_cloud_holds_no_pixel_outside_roi_and_margin(roi_run):
    """Every stored object of an image, opened with the owner's key where it is encrypted."""
    system = roi_run["system"]
    layout = CollectionLayout(system.tenant, COLLECTION)
    scheme = RoiCipher()
    for i in range(N_IMAGES):
        image_id = _image_id(roi_run, i)
        opaque_id = roi_run["uploads"][i]["opaque_id"]
        assert image_id == image_id_for(system.tenant, COLLECTION, opaque_id)
        stored = {k.rsplit("/", 1)[1] for k in system.store.list(layout.image_prefix(image_id))}
        assert stored == {"cipher.png", "mask.png", "meta.json", "sealed.bin"}
        meta = json.loads(system.store.get(layout.meta(image_id)))
        assert meta["key"]["scheme"] == scheme.legacy_name and meta["key"]["mode"] == "per-image"
        assert meta["label"] == (int(roi_run["labels"][i]) if i < N_TRAIN else None)
        cipher = decode_image_png(system.store.get(layout.cipher(image_id)), "cipher")
        cloud_mask = decode_mask_png(system.store.get(layout.mask(image_id)), "mask")
        plain, _ = to_uint8(roi_run["images"][i])
        mask = roi_run["masks"][i]
        key = image_key_for(
            system.master, opaque_id, "per-image", plain.size, salt=meta["key"]["salt"]
        )
        stream = key.stream()
        # The mask is the scrambled ROI, not the tumour mask nor the ROI in place.
        np.testing.assert_array_equal(cloud_mask, scheme.cloud_mask(mask, stream, nonce=opaque_id))
        assert not np.array_equal(cloud_mask, scheme.roi(mask))
        # The cipher is a function of ROI ⊕ margin only: the slice with every other pixel
        # replaced encrypts to the very same stored bytes...
        kept = dilate_mask(scheme.roi(mask), scheme.margin)
        assert 0 < kept.sum() < kept.size * 0.75
        other = np.where(kept, plain, 255 - plain).astype(np.uint8)
        np.testing.assert_array_equal(
            scheme.encrypt(other, stream, mask=mask, nonce=opaque_id), cipher
        )
        # ...and it decrypts, with the tumour mask sealed beside it, to the kept pixels and zeros.
        restored = scheme.decrypt(cipher, stream, mask=mask, nonce=opaque_id)
        np.testing.assert_array_equal(restored, np.where(kept, plain, 0))
    # Nothing else of the images: no raw row, no 8-bit row outside the ROI, no tumour mask.
    keys = system.store.list("")
    cloud = b"".join(system.store.get(k) for k in keys if not k.endswith("sealed.bin"))
    for i, (image, mask) in enumerate(zip(roi_run["images"], roi_run["masks"], strict=True)):
        plain, _ = to_uint8(image)
        needles = {
            "raw row": image.tobytes()[: image.shape[1] * 2],
            "8-bit corner row": plain[2, :24].tobytes(),
            "tumour mask png": encode_png(mask),
            "tumour mask packed": np.packbits(mask, axis=None).tobytes(),
        }
        for name, needle in needles.items():
            assert needle not in cloud, f"image {i}: {name} is in the cloud's store"


def test_tampered_or_swapped_records_are_refused(roi_run):
    system = roi_run["system"]
    layout = CollectionLayout(system.tenant, COLLECTION)
    a, b = _image_id(roi_run, 1), _image_id(roi_run, 2)
    original = {key_of: system.store.get(key_of(a)) for key_of in (layout.meta, layout.sealed)}
    try:
        # One flipped byte of A's blob: the AEAD refuses it, nothing is shown.
        blob = bytearray(original[layout.sealed])
        blob[-5] ^= 0x10
        system.store.put(layout.sealed(a), bytes(blob))
        refused = _plain(system, a)
        assert refused.status_code == 502 and "authentication" in refused.json()["detail"]
        # B's genuine record and blob under A's id: another image's, refused.
        for key_of in (layout.meta, layout.sealed):
            system.store.put(key_of(a), system.store.get(key_of(b)))
        refused = _plain(system, a)
        assert refused.status_code == 502 and "another image" in refused.json()["detail"]
        release = system.encryptor.post(
            "/v1/keys/release", json={"collection": COLLECTION, "image_id": a}
        )
        assert release.status_code == 422 and "another image" in release.json()["detail"]
        # B's blob under A's own record: the blob is bound to B's identity.
        system.store.put(layout.meta(a), original[layout.meta])
        refused = _plain(system, a)
        assert refused.status_code == 502 and "belongs to" in refused.json()["detail"]
    finally:
        for key_of, data in original.items():
            system.store.put(key_of(a), data)
    assert _plain(system, a).status_code == 200


def test_key_release_hands_out_that_image_s_data_key_only(roi_run):
    system = roi_run["system"]
    image_id = _image_id(roi_run, 3)
    released = system.encryptor.post(
        "/v1/keys/release", json={"collection": COLLECTION, "image_id": image_id}
    )
    assert released.status_code == 200, released.text
    body = released.json()
    assert body["mode"] == "pe-roi"
    blob = system.gateway.get(f"/v1/collections/{COLLECTION}/images/{image_id}/sealed").content
    identity = SealedIdentity(
        tenant=system.tenant, collection=COLLECTION, image_id=roi_run["uploads"][3]["opaque_id"]
    )
    opened = open_with_data_key(blob, base64.b64decode(body["data_key"]), identity)
    assert opened.image.tobytes() == roi_run["images"][3].tobytes()


def test_a_collection_holds_one_protection_mode(tmp_path):
    images, masks, labels = labelled_set(2, shape=(64, 64), seed=3)
    with EmbeddedSystem(tmp_path, pe_roi_collections=frozenset({COLLECTION})) as system:
        assert _ingest(system, images[0], masks[0], labels[0], True).status_code == 202
        assert _ingest(system, images[0], masks[0], labels[0], True, "brain").status_code == 202
        encryptor = system.encryptor_app.state.encryptor
        roi = encryptor.protect_roi(COLLECTION, images[1], masks[1], opaque_id="roi-record-01")
        pe = encryptor.protect(
            images[1], masks[1], opaque_id="pe-record-0001", collection=COLLECTION
        )

        def post(collection, cipher, mask, metadata, blob):
            files = {
                "cipher": ("c.png", encode_png(cipher), "image/png"),
                "mask": ("m.png", encode_png(mask), "image/png"),
                "metadata": (None, metadata.model_dump_json()),
            }
            if blob is not None:
                files["blob"] = ("sealed.bin", blob, "application/octet-stream")
            return system.gateway.post(f"/v1/collections/{collection}/images", files=files)

        # A pe record in a pe-roi collection, a pe-roi record in a pe collection: 409.
        refused = post(COLLECTION, pe.cipher, pe.mask, pe.metadata, None)
        assert refused.status_code == 409 and "pe-roi" in refused.json()["detail"]
        refused = post("brain", roi.cipher, roi.mask, roi.metadata, roi.blob)
        assert refused.status_code == 409 and "pe images" in refused.json()["detail"]
        # A pe-roi record without its sealed image, or a pe record with a blob: 422.
        refused = post(COLLECTION, roi.cipher, roi.mask, roi.metadata, None)
        assert refused.status_code == 422 and "blob" in refused.json()["detail"]
        refused = post("brain", pe.cipher, pe.mask, pe.metadata, roi.blob)
        assert refused.status_code == 422 and "blob" in refused.json()["detail"]
        refused = post(COLLECTION, roi.cipher, roi.mask, roi.metadata, b"not a blob at all")
        assert refused.status_code == 422 and "sealed blob" in refused.json()["detail"]
        assert post(COLLECTION, roi.cipher, roi.mask, roi.metadata, roi.blob).status_code == 202
        # Patches wider than the owner's margin would read blank pixels: training refuses.
        wide = system.gateway.post(
            f"/v1/collections/{COLLECTION}/model/train", json={**SMALL_MODEL, "patch_size": 11}
        )
        assert wide.status_code == 202, wide.text
        version = system.gateway.get(wide.json()["status_url"]).json()
        assert version["state"] == "failed" and "at most 9" in version["reason"]
        # What a searcher of another owner learns, and what its encryptor then sends.
        held = {
            c: encryptor.gateway.protection(c, owner=system.tenant) for c in (COLLECTION, "brain")
        }
        assert (held[COLLECTION].mode, held[COLLECTION].scheme) == (
            "pe-roi",
            RoiCipher().legacy_name,
        )
        assert (held["brain"].mode, held["brain"].scheme) == ("pe", None)


def test_the_gateway_frames_sealed_blobs_as_pecore_does():
    from pecbir_gateway.images import SEALED_MAGIC
    from pecore.sealing import SEALED_MAGIC as PECORE_MAGIC

    assert SEALED_MAGIC == PECORE_MAGIC


def test_another_hospitals_pe_roi_hits_open_with_its_released_data_key(tmp_path):
    """hospital-a searches hospital-b's pe-roi collection and opens the hits with the data
    keys hospital-b releases (the blob holds the whole image; the ROI cipher would not do);
    a release of another mode is refused."""
    with EmbeddedSystem(
        tmp_path,
        master=MasterKey.from_seed(MASTER_SEED),
        shared_collections=f"hospital-b/{COLLECTION}=hospital-a",
    ) as system:
        b = system.add_hospital(
            "hospital-b",
            master=MasterKey.from_seed(MASTER_SEED + 1),
            pe_roi_collections=frozenset({COLLECTION}),
        )
        images, masks, labels = labelled_set(N_TRAIN, shape=SHAPE, seed=8)
        originals = {}
        for image, mask, label in zip(images, masks, labels, strict=True):
            answer = _ingest(b, image, mask, label, train=True)
            assert answer.status_code == 202, answer.text
            originals[answer.json()["upload"]["image_id"]] = image
        headers = {"authorization": f"Bearer {system.cloud_token(tenant='hospital-b')}"}
        trained = system.gateway.post(
            f"/v1/collections/{COLLECTION}/model/train", json=SMALL_MODEL, headers=headers
        )
        assert trained.status_code == 202, trained.text
        a, owner = system.encryptor_app.state.encryptor, b.encryptor_app.state.encryptor
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = system.gateway.get(f"/v1/collections/{COLLECTION}/model", headers=headers)
            if status.json()["n_vectors"] >= N_TRAIN:
                break
            time.sleep(0.05)
        answer = a.search(COLLECTION, images[0], masks[0], k=5, owner="hospital-b")
        assert len(answer.hits) == 5
        for hit in answer.hits:
            _, released = owner.release(COLLECTION, hit.image_id)
            assert released["mode"] == "pe-roi"
            opened = a.open_released(COLLECTION, hit.image_id, "hospital-b", released)
            np.testing.assert_array_equal(opened.image, originals[hit.image_id])
        wrong = {**released, "mode": "pe"}
        with pytest.raises(IntegrityError, match="pe-roi"):
            a.open_released(COLLECTION, hit.image_id, "hospital-b", wrong)
