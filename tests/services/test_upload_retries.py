"""Upload retries through every failure point (issue 15): the image id is reserved under the
Idempotency-Key before any object is written, so a retry after a failure between any two
writes, or before the queueing, resumes the same image and leaves no second one behind."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.png import encode_png
from pecbir_contracts.store import StorageError
from pecbir_contracts.tasks import TASK_INDEX_IMAGE
from pecbir_gateway.app import create_app
from pecbir_gateway.settings import GatewaySettings
from pecbir_platform.store import FilesystemStore
from tests.services.conftest import RecordingDispatcher
from tests.services.helpers import TOKEN_SECRET, auth, blob_image, upload_files

URL = "/v1/collections/brain/images"
LAYOUT = CollectionLayout("hosp-a", "brain")


class FailingStore(FilesystemStore):
    """Fails the `fail_at`-th write from now on (0 = the next one), once, as a store outage
    between two writes of one request would."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.fail_at: int | None = None
        self.writes: list[str] = []

    def _write(self, key: str) -> None:
        if self.fail_at is not None:
            if self.fail_at == 0:
                self.fail_at = None
                raise StorageError(f"injected failure before writing {key}")
            self.fail_at -= 1
        self.writes.append(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._write(key)
        super().put(key, data, content_type)

    def put_if_absent(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        self._write(key)
        return super().put_if_absent(key, data, content_type)


def _no_search(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, json={"detail": "no search service in this test"})


@pytest.fixture
def failing(tmp_path):
    store = FailingStore(tmp_path / "store")
    dispatcher = RecordingDispatcher()
    settings = GatewaySettings(token_secret=TOKEN_SECRET.decode(), max_pixels=512 * 512)
    search = httpx.Client(base_url="http://search", transport=httpx.MockTransport(_no_search))
    app = create_app(settings, store=store, dispatcher=dispatcher, search_client=search)
    return TestClient(app), store, dispatcher


def _image_dirs(store: FilesystemStore) -> set[str]:
    return {key.split("/")[-2] for key in store.list(LAYOUT.images_prefix)}


def _writes_of_one_upload(failing) -> list[str]:
    client, store, _ = failing
    image, mask = blob_image(seed=99)
    store.writes.clear()
    answer = client.post(
        URL, files=upload_files(image, mask), headers=auth() | {"Idempotency-Key": "probe-0001"}
    )
    assert answer.status_code == 202, answer.text
    return list(store.writes)


def test_the_id_is_reserved_before_any_object_is_written(failing):
    writes = _writes_of_one_upload(failing)
    assert "/idempotency/" in writes[0]
    assert [key.rsplit("/", 1)[-1] for key in writes[1:]] == ["cipher.png", "mask.png", "meta.json"]


@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_a_retry_after_a_failure_before_any_write_resumes_the_same_image(failing, fail_at):
    client, store, dispatcher = failing
    image, mask = blob_image(seed=fail_at)
    headers = auth() | {"Idempotency-Key": f"retry-{fail_at}-0001"}
    store.fail_at = fail_at
    failed = client.post(URL, files=upload_files(image, mask), headers=headers)
    assert failed.status_code == 503, failed.text
    assert "object store unavailable" in failed.json()["detail"]
    assert dispatcher.sent == []
    retry = client.post(URL, files=upload_files(image, mask), headers=headers)
    assert retry.status_code == 202, retry.text
    image_id = retry.json()["image_id"]
    assert _image_dirs(store) == {image_id}
    assert store.get(LAYOUT.cipher(image_id)) == encode_png(image)
    assert store.exists(LAYOUT.meta(image_id))
    assert dispatcher.sent == [(TASK_INDEX_IMAGE, ("hosp-a", "brain", image_id))]
    # And once more: the original answer, queued again (idempotent), nothing new stored.
    again = client.post(URL, files=upload_files(image, mask), headers=headers)
    assert again.json() == retry.json()
    assert _image_dirs(store) == {image_id}


def test_a_retry_after_the_broker_failed_resumes_the_same_image(failing):
    client, store, dispatcher = failing
    image, mask = blob_image(seed=7)
    headers = auth() | {"Idempotency-Key": "retry-broker-0001"}
    dispatcher.fail = True
    failed = client.post(URL, files=upload_files(image, mask), headers=headers)
    assert failed.status_code == 503
    dispatcher.fail = False
    retry = client.post(URL, files=upload_files(image, mask), headers=headers)
    assert retry.status_code == 202
    assert retry.json()["image_id"] == failed.json()["image_id"]
    assert _image_dirs(store) == {retry.json()["image_id"]}


def test_another_body_under_a_reserved_key_conflicts_even_before_the_image_is_complete(failing):
    client, store, _ = failing
    image, mask = blob_image(seed=3)
    headers = auth() | {"Idempotency-Key": "retry-conflict-01"}
    store.fail_at = 1  # reserved, then the cipher write fails
    assert client.post(URL, files=upload_files(image, mask), headers=headers).status_code == 503
    other, other_mask = blob_image(seed=4)
    conflict = client.post(URL, files=upload_files(other, other_mask), headers=headers)
    assert conflict.status_code == 409
    assert "Idempotency-Key" in conflict.json()["detail"]
    assert store.list(LAYOUT.images_prefix) == []
