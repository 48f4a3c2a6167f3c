"""Two gateway replicas (real uvicorn processes) on one S3 store (Ceph radosgw) and one broker.

Idempotency records and model version numbers are claimed with put_if_absent; here requests
race for the same claim at both replicas at once. (No worker: the queued tasks stay queued.)
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pecbir_contracts.layout import CollectionLayout, idempotency_record_key, version_name
from pecbir_contracts.png import encode_png
from pecbir_platform.store import MinioStore
from tests.services.helpers import TOKEN_SECRET, auth, blob_image, metadata_json, upload_files

pytestmark = pytest.mark.integration

PER_REPLICA = 4  # concurrent requests at each replica per race


@dataclass
class Replicas:
    urls: list[str]
    store: MinioStore


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, radosgw) -> Iterator[Replicas]:
    from pecbir_harness.procs import S3Bucket, redis_server, service_app

    tmp: Path = tmp_path_factory.mktemp("replicas")
    s3 = S3Bucket.on(radosgw, "replicas")
    store = s3.open()  # creates the bucket before two replicas race to
    with contextlib.ExitStack() as stack:
        env = {
            **s3.env(),
            "PECBIR_BROKER_URL": stack.enter_context(redis_server(tmp)),
            "PECBIR_TOKEN_SECRET": TOKEN_SECRET.decode(),
        }
        urls = [
            stack.enter_context(service_app("gateway", env, tmp / f"gateway-{i}.log"))
            for i in range(2)
        ]
        yield Replicas(urls, store)


def _race(urls: list[str], path: str, requests: list[dict]) -> list[httpx.Response]:
    """Send requests[i] to replica i % 2, all released at the same moment."""
    start = threading.Barrier(len(requests))

    def send(i: int) -> httpx.Response:
        with httpx.Client(base_url=urls[i % len(urls)], timeout=60) as client:
            start.wait(timeout=60)
            return client.post(path, **requests[i])

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, range(len(requests))))


def _images(store: MinioStore, collection: str) -> list[str]:
    layout = CollectionLayout("hosp-a", collection)
    return [i for i in map(layout.image_id_of_meta, store.list(layout.images_prefix)) if i]


@pytest.mark.parametrize("round_", range(3))
def test_one_key_with_different_bodies_at_both_replicas_is_accepted_once(replicas, round_):
    collection, key = f"conflict-{round_}", f"upload-key-{round_:04d}"
    bodies = []
    for seed in range(2 * PER_REPLICA):
        image, mask = blob_image(seed)
        meta = metadata_json(image.shape, opaque_id=f"opaque-{seed:04d}")
        bodies.append({"files": upload_files(image, mask, meta), "cipher": encode_png(image)})
    headers = {**auth(), "Idempotency-Key": key}
    answers = _race(
        replicas.urls,
        f"/v1/collections/{collection}/images",
        [{"files": body["files"], "headers": headers} for body in bodies],
    )
    codes = [answer.status_code for answer in answers]
    assert sorted(codes) == [202] + [409] * (len(bodies) - 1), [a.text for a in answers]
    winner = codes.index(202)
    image_id = answers[winner].json()["image_id"]
    # The losers removed what they had stored: one image, the winner's, under the record.
    assert _images(replicas.store, collection) == [image_id]
    layout = CollectionLayout("hosp-a", collection)
    assert replicas.store.get(layout.cipher(image_id)) == bodies[winner]["cipher"]
    record = json.loads(replicas.store.get(idempotency_record_key("hosp-a", key)))
    assert record["image_id"] == image_id


def test_one_key_with_the_same_body_at_both_replicas_gets_one_answer(replicas):
    image, mask = blob_image(7)
    request = {
        "files": upload_files(image, mask),
        "headers": {**auth(), "Idempotency-Key": "same-body-key"},
    }
    answers = _race(replicas.urls, "/v1/collections/same/images", [request] * 2 * PER_REPLICA)
    assert [a.status_code for a in answers] == [202] * 2 * PER_REPLICA, [a.text for a in answers]
    image_ids = {answer.json()["image_id"] for answer in answers}
    assert len(image_ids) == 1
    assert _images(replicas.store, "same") == list(image_ids)


def test_training_at_both_replicas_allocates_distinct_versions(replicas):
    n = 2 * PER_REPLICA
    answers = _race(
        replicas.urls,
        "/v1/collections/versions/model/train",
        [{"json": {"n_components": 4 + i}, "headers": auth()} for i in range(n)],
    )
    assert [a.status_code for a in answers] == [202] * n, [a.text for a in answers]
    versions = sorted(answer.json()["version"] for answer in answers)
    assert versions == [version_name(number) for number in range(1, n + 1)]
    # Each version holds the parameters of the request it was allocated to.
    layout = CollectionLayout("hosp-a", "versions")
    for i, answer in enumerate(answers):
        stored = json.loads(replicas.store.get(layout.train_request(answer.json()["version"])))
        assert stored["n_components"] == 4 + i
