"""Real processes: Redis, Celery worker, Ceph radosgw, uvicorn gateway/search/encryptor.

One walk from a DICOMweb client (STOW-RS) through the encryptor into the cloud, to a search
hit decrypted bit-exactly; the search service restarted and caught up from S3; a poison
message dead-lettered by the real worker; a gateway given wrong S3 credentials refusing to start.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from pecbir_harness.dicom import make_mr
from pecbir_harness.procs import free_port
from pecore.cipher import to_uint8
from tests.services.helpers import SMALL_MODEL, labelled_set, make_seg, npy_bytes

pytestmark = pytest.mark.integration
MODEL = {**SMALL_MODEL, "dim": 3}
SEALED = "sealed-brain"


def _poll(check, what: str, timeout: float = 90.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, radosgw):
    from pecbir_harness.procs import Cluster, S3Bucket

    # SSE-C on: the store encrypts every object at rest under a key it does not keep.
    s3 = S3Bucket.on(radosgw, "integration", sse_c=True)
    # "brain" takes PACS pushes: its uploads are templates by the owner's policy; the sealed
    # collection's are not unless marked.
    with Cluster(
        tmp_path_factory.mktemp("cluster"),
        s3=s3,
        sealed_collections=(SEALED,),
        template_collections=("brain",),
    ) as running:
        yield running


def test_dicom_from_stow_rs_to_a_decrypted_search_hit(cluster):
    from dicomweb_client.api import DICOMwebClient

    gateway = httpx.Client(
        base_url=cluster.gateway_url, headers={"authorization": f"Bearer {cluster.token()}"}
    )
    encryptor = httpx.Client(
        base_url=cluster.encryptor_url,
        headers={"authorization": f"Bearer {cluster.user_token()}"},
        timeout=60,
    )
    images, masks, labels = labelled_set(12, shape=(48, 48), seed=3)
    for image, mask, label in zip(images, masks, labels, strict=True):
        answer = encryptor.post(
            "/v1/collections/brain/images",
            files={"image": ("x.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
            data={"label": str(label), "train": "true"},
        )
        assert answer.status_code == 202, answer.text
    trained = gateway.post("/v1/collections/brain/model/train", json=MODEL)
    assert trained.status_code == 202, trained.text

    def served(n: int):
        status = gateway.get("/v1/collections/brain/model").json()
        return status if status["serving_version"] and status["n_vectors"] >= n else None

    _poll(lambda: served(12), "12 vectors served")

    # A PACS pushes one 12-bit MR slice and its DICOM SEG over DICOMweb STOW-RS.
    pixels, mask = labelled_set(1, shape=(48, 48), seed=99)[0][0], labelled_set(1, seed=99)[1][0]
    dataset = make_mr(pixels.astype(np.uint16), bits_stored=12)
    seg = make_seg(mask, dataset, label="meningioma")
    pacs = DICOMwebClient(
        url=f"{cluster.encryptor_url}/dicomweb/brain",
        headers={"Authorization": f"Bearer {cluster.user_token()}"},
    )
    response = pacs.store_instances(datasets=[dataset, seg])
    stored = {item.ReferencedSOPInstanceUID: item for item in response.ReferencedSOPSequence}
    assert set(stored) == {dataset.SOPInstanceUID, seg.SOPInstanceUID}
    assert "FailedSOPSequence" not in response
    # The RetrieveURL is WADO-RS: a DICOMweb client opens the decrypted instance there.
    url = stored[dataset.SOPInstanceUID].RetrieveURL
    assert url.endswith(
        f"/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
        f"/instances/{dataset.SOPInstanceUID}"
    )
    retrieved = pacs.retrieve_instance(
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
    )
    np.testing.assert_array_equal(retrieved.pixel_array, to_uint8(pixels.astype(np.uint16))[0])
    assert retrieved.LossyImageCompression == "01" and str(retrieved.PatientName) == ""
    # (dicomweb-client sends a Host header without the port, so the URL's authority is off
    # here: PECBIR_ENCRYPTOR_PUBLIC_URL fixes it in a deployment; the path is what counts.)
    image_id = encryptor.get(urlsplit(url).path).headers["x-pecbir-image-id"]

    def searchable():
        status = gateway.get(f"/v1/collections/brain/images/{image_id}/status").json()
        return status["state"] == "searchable"

    _poll(searchable, "uploaded DICOM searchable")
    # The cloud stored no header value.
    meta = gateway.get(f"/v1/collections/brain/images/{image_id}").json()
    assert meta["label"] == 1 and "Doe" not in str(meta) and dataset.SOPInstanceUID not in str(meta)

    # A user searches with the same slice (encrypted under a fresh key) and finds it.
    answer = encryptor.post(
        "/v1/collections/brain/search",
        files={"image": ("q.npy", npy_bytes(pixels)), "mask": ("m.npy", npy_bytes(mask))},
        data={"k": "13"},
    )
    assert answer.status_code == 200, answer.text
    hits = {hit["image_id"]: hit for hit in answer.json()["hits"]}
    assert image_id in hits and len(hits) == 13
    plain = encryptor.get(hits[image_id]["plain_url"], params={"format": "npy"})
    assert plain.status_code == 200, plain.text
    expected, _ = to_uint8(pixels.astype(np.uint16))
    np.testing.assert_array_equal(np.load(io.BytesIO(plain.content)), expected)

    # The search service restarts and catches up from S3 alone: nothing indexed is missing.
    before = served(13)
    cluster.stop_search()
    cluster.start_search()
    after = _poll(lambda: served(13), "search caught up after restart", timeout=60)
    assert after["n_vectors"] == before["n_vectors"]
    assert after["serving_version"] == before["serving_version"]


def test_a_corrected_seg_retires_the_old_version_in_every_service(cluster):
    """Issue 14: the encryptor retires the superseded version once the new one is searchable;
    the real worker announces it on the Redis stream, the search process drops it and does not
    bring it back when it catches up from S3 after a restart."""
    from dicomweb_client.api import DICOMwebClient

    gateway = httpx.Client(
        base_url=cluster.gateway_url, headers={"authorization": f"Bearer {cluster.token()}"}
    )
    encryptor = httpx.Client(
        base_url=cluster.encryptor_url,
        headers={"authorization": f"Bearer {cluster.user_token()}"},
        timeout=60,
    )
    pacs = DICOMwebClient(
        url=f"{cluster.encryptor_url}/dicomweb/brain",
        headers={"Authorization": f"Bearer {cluster.user_token()}"},
    )

    def n_vectors() -> int:
        return int(gateway.get("/v1/collections/brain/model").json()["n_vectors"])

    images, masks, _ = labelled_set(1, shape=(48, 48), seed=123)
    dataset = make_mr(images[0].astype(np.uint16), bits_stored=12)
    pacs.store_instances(datasets=[dataset, make_seg(masks[0], dataset, label="glioma")])
    uids = (dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
    wado = "/dicomweb/brain/studies/{}/series/{}/instances/{}".format(*uids)
    old_id = encryptor.get(wado).headers["x-pecbir-image-id"]
    _poll(
        lambda: (
            gateway.get(f"/v1/collections/brain/images/{old_id}/status").json()["state"]
            == "searchable"
        ),
        "first version searchable",
    )
    held = n_vectors()
    corrected = make_seg(np.roll(masks[0], 3, axis=1), dataset, label="glioma")
    pacs.store_instances(datasets=[corrected])
    _poll(lambda: n_vectors() == held + 1, "corrected version indexed")

    def settled():
        # A search at the hospital promotes the new version once searchable and retires the
        # old one in the cloud.
        encryptor.post(
            "/v1/collections/brain/search",
            files={
                "image": ("q.npy", npy_bytes(images[0])),
                "mask": ("m.npy", npy_bytes(masks[0])),
            },
            data={"k": "5"},
        )
        status = gateway.get(f"/v1/collections/brain/images/{old_id}/status").json()
        return status["state"] == "retired"

    _poll(settled, "old version retired in the cloud")
    _poll(lambda: n_vectors() == held, "search process dropped the old vector")
    new_id = encryptor.get(wado).headers["x-pecbir-image-id"]
    assert new_id != old_id
    assert gateway.get(f"/v1/collections/brain/images/{new_id}/status").json()["state"] == (
        "searchable"
    )
    cluster.stop_search()
    cluster.start_search()
    _poll(lambda: n_vectors() == held, "search caught up after restart", timeout=60)
    time.sleep(1.0)  # the stream replayed after the catch-up does not bring it back either
    assert n_vectors() == held


def test_poison_upload_is_dead_lettered_by_the_worker(cluster):
    import redis

    from pecbir_contracts.layout import CollectionLayout
    from pecbir_contracts.tasks import QUEUE_DEAD_LETTER, TASK_INDEX_IMAGE

    gateway = httpx.Client(
        base_url=cluster.gateway_url, headers={"authorization": f"Bearer {cluster.token()}"}
    )
    store = cluster.s3.open()
    layout = CollectionLayout(cluster.tenant, "brain")
    # What the services stored is unreadable without the SSE-C key.
    from dataclasses import replace

    from pecbir_contracts.store import StorageError

    keyless = replace(cluster.s3, sse_c_key="").open()
    with pytest.raises(StorageError, match="InvalidArgument"):
        keyless.get(store.list(layout.images_prefix)[0])
    from pecbir_contracts.records import read_retired

    # Not the image the previous test retired: the worker skips a retired image on purpose,
    # so it would never fail (ids are random, so which one lists first varies per run).
    retired = read_retired(store, layout)
    image_ids = [layout.image_id_of_meta(k) for k in store.list(layout.images_prefix)]
    victim = next(i for i in image_ids if i and i not in retired)
    # Corrupt a stored mask behind the gateway's back, drop its features, re-queue it.
    store.put(layout.mask(victim), b"\x89PNG\r\n\x1a\nbroken")
    version = gateway.get("/v1/collections/brain/model").json()["indexing_version"]
    store.delete(layout.features(version, victim))
    from celery import Celery

    Celery(broker=cluster.redis_url).send_task(
        TASK_INDEX_IMAGE, args=[cluster.tenant, "brain", victim], queue="pecbir.index"
    )

    def failed():
        status = gateway.get(f"/v1/collections/brain/images/{victim}/status").json()
        return status if status["state"] == "failed" else None

    status = _poll(failed, "failure recorded", timeout=60)
    assert "unusable" in status["detail"]
    assert redis.Redis.from_url(cluster.redis_url).llen(QUEUE_DEAD_LETTER) >= 1


def test_encryptor_cli_uploads_and_fetches_bit_exactly(cluster, tmp_path):
    from PIL import Image

    images, masks, _ = labelled_set(1, shape=(48, 48), seed=5)
    image_path, mask_path = tmp_path / "slice.npy", tmp_path / "mask.png"
    np.save(image_path, images[0])
    Image.fromarray(masks[0].astype(np.uint8) * 255).save(mask_path)
    env = {
        **os.environ,
        "PECBIR_ENCRYPTOR_TENANT": cluster.tenant,
        "PECBIR_ENCRYPTOR_MASTER_KEY": str(cluster.tmp / "master.key"),
        "PECBIR_ENCRYPTOR_GATEWAY_URL": cluster.gateway_url,
        "PECBIR_ENCRYPTOR_GATEWAY_TOKEN": cluster.token(),
        "PECBIR_ENCRYPTOR_USER_TOKEN_SECRET": cluster.user_secret,
        "PECBIR_ENCRYPTOR_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    cli = [sys.executable, "-m", "pecbir_encryptor"]
    uploaded = subprocess.run(
        [*cli, "upload", str(image_path), str(mask_path), "--collection", "cli", "--label", "2"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    image_id = json.loads(uploaded.stdout)["upload"]["image_id"]
    out = tmp_path / "plain.npy"
    subprocess.run(
        [*cli, "fetch", image_id, "--collection", "cli", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    expected, _ = to_uint8(images[0])
    np.testing.assert_array_equal(np.load(out), expected)
    missing = subprocess.run(
        [*cli, "upload", str(image_path), str(tmp_path / "none.png"), "--collection", "cli"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2 and "none.png" in missing.stderr


def _redis_dump(url: str) -> bytes:
    """Every key and value of the cluster's Redis (strings, lists, hashes, sets, streams)."""
    import redis

    client = redis.Redis.from_url(url)
    parts: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        parts.append(key)
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"list":
            parts += client.lrange(key, 0, -1)
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                parts += [field, value]
        elif kind in (b"set", b"zset"):
            parts += list(client.smembers(key)) if kind == b"set" else client.zrange(key, 0, -1)
        elif kind == b"stream":
            for _id, fields in client.xrange(key):
                for field, value in fields.items():
                    parts += [field, value]
    return b"\n".join(parts)


def test_sealed_collection_leaks_no_pixel_mask_or_private_label(cluster):
    """A full sealed run through the real processes, then store, Redis and logs are scanned."""
    from dicomweb_client.api import DICOMwebClient

    from pecbir_contracts.png import encode_png

    gateway = httpx.Client(
        base_url=cluster.gateway_url, headers={"authorization": f"Bearer {cluster.token()}"}
    )
    encryptor = httpx.Client(
        base_url=cluster.encryptor_url,
        headers={"authorization": f"Bearer {cluster.user_token()}"},
        timeout=60,
    )
    images, masks, labels = labelled_set(12, shape=(48, 48), seed=13)
    published = encryptor.post(
        f"/v1/collections/{SEALED}/patch-model",
        files=[("images", (f"{i}.npy", npy_bytes(im))) for i, im in enumerate(images)]
        + [("masks", (f"{i}.npy", npy_bytes(m))) for i, m in enumerate(masks)],
        data={"n_components": "4", "n_regions": "2", "patch_size": "5", "radius": "2"},
    )
    assert published.status_code == 201, published.text
    ids = []
    for i, (image, mask, label) in enumerate(zip(images, masks, labels, strict=True)):
        # 0-8 marked templates, 9-10 marked not, 11 not marked (the default: not a template)
        data = {"label": str(label)} | ({"train": "true" if i < 9 else "false"} if i < 11 else {})
        answer = encryptor.post(
            f"/v1/collections/{SEALED}/images",
            files={"image": ("x.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
            data=data,
        )
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["upload"]["image_id"])
    trained = gateway.post(f"/v1/collections/{SEALED}/model/train", json={"dim": 2})
    assert trained.status_code == 202, trained.text

    def served(n: int):
        status = gateway.get(f"/v1/collections/{SEALED}/model").json()
        return status if status["serving_version"] and status["n_vectors"] >= n else None

    _poll(lambda: served(12), "12 sealed vectors served")
    # A PACS pushes one more slice with its SEG over STOW-RS into the sealed collection.
    pixels, mask = labelled_set(1, shape=(48, 48), seed=98)[0][0], labelled_set(1, seed=98)[1][0]
    dataset = make_mr(pixels.astype(np.uint16), bits_stored=12)
    pacs = DICOMwebClient(
        url=f"{cluster.encryptor_url}/dicomweb/{SEALED}",
        headers={"Authorization": f"Bearer {cluster.user_token()}"},
    )
    response = pacs.store_instances(datasets=[dataset, make_seg(mask, dataset, "glioma")])
    assert "FailedSOPSequence" not in response
    _poll(lambda: served(13), "the STOW image served")
    for query, query_mask, expected in ((images[10], masks[10], ids[10]), (pixels, mask, None)):
        answer = encryptor.post(
            f"/v1/collections/{SEALED}/search",
            files={"image": ("q.npy", npy_bytes(query)), "mask": ("m.npy", npy_bytes(query_mask))},
            data={"k": "3"},
        )
        assert answer.status_code == 200, answer.text
        top = answer.json()["hits"][0]
        if expected is not None:
            assert top["image_id"] == expected and top["label"] is None
        plain = encryptor.get(top["plain_url"], params={"format": "npy"})
        assert plain.status_code == 200, plain.text
        opened = np.load(io.BytesIO(plain.content))
        assert (
            opened.tobytes() == (query.astype(np.uint16) if expected is None else query).tobytes()
        )

    # What a cloud operator can read: the object store, Redis and every service's log.
    store = cluster.s3.open()
    keys = [k for k in store.list("") if f"/collections/{SEALED}/" in k]
    assert any(k.endswith("sealed.bin") for k in keys)
    assert not any(k.endswith(("cipher.png", "mask.png")) for k in keys)
    cloud = b"".join(store.get(k) for k in keys)
    redis_bytes = _redis_dump(cluster.redis_url)
    logs = b"".join(p.read_bytes() for p in cluster.logs.glob("*.log"))
    assert len(logs) > 1000 and len(redis_bytes) > 1000, "nothing to scan: the check is void"
    needles = {}
    for i, (image, plain_mask) in enumerate([*zip(images, masks, strict=True), (pixels, mask)]):
        raw = image.astype(np.uint16).tobytes()
        needles[f"image {i} row"] = raw[96 * 20 : 96 * 21]
        needles[f"mask {i} packed"] = np.packbits(plain_mask, axis=None).tobytes()
        needles[f"mask {i} png"] = encode_png(plain_mask)
    for name, needle in needles.items():
        for where, haystack in (("store", cloud), ("Redis", redis_bytes), ("logs", logs)):
            assert needle not in haystack, f"{name} found in the {where}"
    stored = {item.ReferencedSOPInstanceUID: item for item in response.ReferencedSOPSequence}
    retrieve = urlsplit(stored[dataset.SOPInstanceUID].RetrieveURL).path
    stow_id = encryptor.get(retrieve).headers["x-pecbir-image-id"]
    for image_id in [*ids[9:], stow_id]:
        meta = json.loads(
            store.get(f"tenants/{cluster.tenant}/collections/{SEALED}/images/{image_id}/meta.json")
        )
        assert meta["label"] is None and meta["mode"] == "sealed"


def test_gateway_with_wrong_store_credentials_refuses_to_start(cluster, tmp_path):
    from dataclasses import replace

    from pecbir_harness.procs import BIN
    from pecbir_harness.services import SERVICES

    wrong = replace(cluster.s3, secret_key=cluster.s3.secret_key[::-1])
    env = {**os.environ, **cluster.env, **wrong.env()}
    args = SERVICES["gateway"].command(port=free_port(), bin_dir=BIN)
    started = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode != 0
    assert "refused the credentials" in started.stderr
    assert "PECBIR_S3_SECRET_KEY" in started.stderr
