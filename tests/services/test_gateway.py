"""Gateway unit tests: FastAPI TestClient, filesystem store, a recording task dispatcher."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.png import encode_png
from pecbir_contracts.store import UnsupportedStore
from pecbir_contracts.tasks import TASK_INDEX_IMAGE, TASK_TRAIN_MODEL
from pecbir_gateway.app import create_app
from pecbir_gateway.settings import GatewaySettings
from tests.services.conftest import RecordingDispatcher
from tests.services.helpers import (
    TOKEN_SECRET,
    OverwritingStore,
    auth,
    blob_image,
    metadata_json,
    png_claiming,
    upload_files,
)

URL = "/v1/collections/brain/images"


def _no_search(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, json={"detail": "no search service in this test"})


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture
def client(store, dispatcher) -> TestClient:
    settings = GatewaySettings(
        token_secret=TOKEN_SECRET.decode(),
        max_upload_bytes=200_000,
        max_pixels=512 * 512,
        shared_collections="hosp-a/brain=hosp-b",
    )
    search = httpx.Client(base_url="http://search", transport=httpx.MockTransport(_no_search))
    app = create_app(settings, store=store, dispatcher=dispatcher, search_client=search)
    return TestClient(app)


def _stored_images(store) -> list[str]:
    layout = CollectionLayout("hosp-a", "brain")
    return [k for k in store.list(layout.images_prefix) if k.endswith("meta.json")]


def test_upload_is_stored_then_queued_with_ids_only(client, store, dispatcher):
    image, mask = blob_image()
    answer = client.post(URL, files=upload_files(image, mask), headers=auth())
    assert answer.status_code == 202, answer.text
    body = answer.json()
    image_id = body["image_id"]
    layout = CollectionLayout("hosp-a", "brain")
    assert store.exists(layout.cipher(image_id)) and store.exists(layout.mask(image_id))
    assert json.loads(store.get(layout.meta(image_id)))["opaque_id"] == "opaque-0001"
    assert dispatcher.sent == [(TASK_INDEX_IMAGE, ("hosp-a", "brain", image_id))]
    status = client.get(body["status_url"], headers=auth())
    assert status.status_code == 200
    assert status.json()["state"] == "awaiting_model"
    assert 0 <= status.json()["waiting_s"] < 3600  # how long it has waited, and why
    assert "no model" in status.json()["detail"]
    cipher = client.get(f"{URL}/{image_id}/cipher", headers=auth())
    assert cipher.status_code == 200 and cipher.content == encode_png(image)


def test_status_says_an_upload_was_given_up_under_the_current_version(client, store):
    from pecbir_contracts.records import write_current_version, write_failure

    image, mask = blob_image()
    image_id = client.post(URL, files=upload_files(image, mask), headers=auth()).json()["image_id"]
    layout = CollectionLayout("hosp-a", "brain")
    write_current_version(store, layout, "v0002")
    status = client.get(f"{URL}/{image_id}/status", headers=auth()).json()
    assert status["state"] == "stored"  # waiting for its index
    reason = "ValueError: no patch fits (3 attempts)"
    write_failure(store, layout.version_failure("v0002", image_id), reason, version="v0002")
    status = client.get(f"{URL}/{image_id}/status", headers=auth()).json()
    assert (status["state"], status["model_version"]) == ("failed", "v0002")
    assert reason in status["detail"] and "served without this image" in status["detail"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer not.a.token"}, 401),
        ({"Authorization": "Basic dXNlcjpwdw=="}, 401),
        (auth(scopes=("search",)), 403),
        (auth(ttl_s=60, now=time.time() - 3600), 401),
    ],
)
def test_upload_needs_a_valid_token_with_upload_scope(client, store, headers, status):
    image, mask = blob_image()
    answer = client.post(URL, files=upload_files(image, mask), headers=headers)
    assert answer.status_code == status, answer.text
    assert _stored_images(store) == []


def test_token_signed_with_another_secret_is_refused(client):
    from pecbir_contracts.auth import GATEWAY_TOKEN, mint_token

    forged = mint_token(
        b"x" * 40, kind=GATEWAY_TOKEN, sub="eve", tenant="hosp-a", scopes=["upload"]
    )
    image, mask = blob_image()
    answer = client.post(
        URL, files=upload_files(image, mask), headers={"Authorization": f"Bearer {forged}"}
    )
    assert answer.status_code == 401
    assert "signature" in answer.json()["detail"]


def _bad_uploads():
    image, mask = blob_image()
    rgb = encode_png(image)  # replaced below by a real RGB PNG
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(np.stack([image] * 3, axis=-1)).save(buffer, format="PNG")
    rgb = buffer.getvalue()
    grey_mask = mask.astype(np.uint8) * 255
    grey_mask[0, 0] = 7
    return [
        ("not a png", {"cipher": ("c.png", b"GIF89a....", "image/png")}, 422, "not a PNG"),
        ("rgb", {"cipher": ("c.png", rgb, "image/png")}, 422, "mode"),
        ("truncated", {"cipher": ("c.png", encode_png(image)[:60], "image/png")}, 422, "corrupt"),
        ("mask not binary", {"mask": ("m.png", encode_png(grey_mask), "image/png")}, 422, "binary"),
        (
            "mask empty",
            {"mask": ("m.png", encode_png(np.zeros_like(mask)), "image/png")},
            422,
            "empty",
        ),
        (
            "shapes differ",
            {"mask": ("m.png", encode_png(np.ones((40, 48), bool)), "image/png")},
            422,
            "differ",
        ),
        (
            "bomb",
            {"cipher": ("c.png", png_claiming(60_000, 60_000), "image/png")},
            413,
            "decompression bomb",
        ),
        (
            "too many pixels",
            {"cipher": ("c.png", png_claiming(1024, 1024), "image/png")},
            413,
            "limit",
        ),
        (
            "too many bytes",
            {"cipher": ("c.png", b"\x89PNG" + b"0" * 300_000, "image/png")},
            413,
            "bytes",
        ),
        ("bad metadata", {"metadata": (None, '{"opaque_id": "x"}')}, 422, "metadata"),
        (
            "metadata size",
            {"metadata": (None, metadata_json((47, 48)))},
            422,
            "47x48",
        ),
        (
            "query with label",
            {"metadata": (None, metadata_json((48, 48)).replace('"template"', '"query"'))},
            422,
            "label",
        ),
    ]


@pytest.mark.parametrize(("name", "override", "status", "message"), _bad_uploads())
def test_invalid_uploads_are_refused_and_nothing_is_stored(
    client, store, dispatcher, name, override, status, message
):
    image, mask = blob_image()
    files = upload_files(image, mask) | override
    answer = client.post(URL, files=files, headers=auth())
    assert answer.status_code == status, (name, answer.text)
    assert message in json.dumps(answer.json()["detail"]), answer.text
    assert _stored_images(store) == []
    assert store.list("tenants/") == []
    assert dispatcher.sent == []


def test_same_idempotency_key_same_body_replays_other_body_conflicts(client, store):
    image, mask = blob_image()
    headers = auth() | {"Idempotency-Key": "upload-0001-abc"}
    first = client.post(URL, files=upload_files(image, mask), headers=headers)
    again = client.post(URL, files=upload_files(image, mask), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert len(_stored_images(store)) == 1
    other, other_mask = blob_image(seed=5)
    conflict = client.post(URL, files=upload_files(other, other_mask), headers=headers)
    assert conflict.status_code == 409
    assert "Idempotency-Key" in conflict.json()["detail"]
    assert len(_stored_images(store)) == 1
    # The original object is untouched by the conflicting request.
    image_id = first.json()["image_id"]
    layout = CollectionLayout("hosp-a", "brain")
    assert store.get(layout.cipher(image_id)) == encode_png(image)


def test_broker_down_answers_503_and_a_retry_with_the_same_key_queues(client, store, dispatcher):
    image, mask = blob_image()
    headers = auth() | {"Idempotency-Key": "upload-0002-abc"}
    dispatcher.fail = True
    down = client.post(URL, files=upload_files(image, mask), headers=headers)
    assert down.status_code == 503
    assert "retry" in down.json()["detail"]
    dispatcher.fail = False
    retry = client.post(URL, files=upload_files(image, mask), headers=headers)
    assert retry.status_code == 202
    assert retry.json()["image_id"] == down.json()["image_id"]
    assert dispatcher.sent == [(TASK_INDEX_IMAGE, ("hosp-a", "brain", retry.json()["image_id"]))]
    assert len(_stored_images(store)) == 1


def test_tenants_are_isolated_and_sharing_is_read_only(client, store):
    image, mask = blob_image()
    image_id = client.post(URL, files=upload_files(image, mask), headers=auth()).json()["image_id"]
    # Tenant C: own (empty) collection has no such image; A's collection is not shared with C.
    assert client.get(f"{URL}/{image_id}", headers=auth("hosp-c")).status_code == 404
    foreign = client.get(f"{URL}/{image_id}?owner=hosp-a", headers=auth("hosp-c"))
    assert foreign.status_code == 403 and "not shared" in foreign.json()["detail"]
    # Tenant B is a consortium member for hosp-a/brain: may read, may not upload there.
    shared = client.get(f"{URL}/{image_id}?owner=hosp-a", headers=auth("hosp-b"))
    assert shared.status_code == 200 and shared.json()["opaque_id"] == "opaque-0001"
    own = client.post(URL, files=upload_files(image, mask), headers=auth("hosp-b"))
    assert own.status_code == 202
    assert store.exists(CollectionLayout("hosp-b", "brain").meta(own.json()["image_id"]))


def test_presigned_link_on_the_filesystem_store(client):
    image, mask = blob_image()
    image_id = client.post(URL, files=upload_files(image, mask), headers=auth()).json()["image_id"]
    link = client.get(f"{URL}/{image_id}/mask?presign=true", headers=auth())
    assert link.status_code == 200
    url = link.json()["url"]
    blob = client.get(url)
    assert blob.status_code == 200 and blob.content == encode_png(mask)
    tampered = url[:-3] + ("000" if not url.endswith("000") else "111")
    assert client.get(tampered).status_code == 403


def test_unknown_and_malformed_image_ids(client):
    assert client.get(f"{URL}/{'0' * 32}", headers=auth()).status_code == 404
    assert client.get(f"{URL}/..%2F..%2Fetc/cipher", headers=auth()).status_code in (404, 422)
    assert client.get(f"{URL}/nothex/status", headers=auth()).status_code == 422


def test_train_allocates_versions_and_queues_ids_only(client, store, dispatcher):
    first = client.post("/v1/collections/brain/model/train", json={"dim": 5}, headers=auth())
    second = client.post("/v1/collections/brain/model/train", headers=auth())
    assert first.status_code == second.status_code == 202
    assert (first.json()["version"], second.json()["version"]) == ("v0001", "v0002")
    assert dispatcher.sent == [
        (TASK_TRAIN_MODEL, ("hosp-a", "brain", "v0001")),
        (TASK_TRAIN_MODEL, ("hosp-a", "brain", "v0002")),
    ]
    state = client.get("/v1/collections/brain/model/v0001", headers=auth()).json()
    assert state["state"] == "queued" and state["params"]["dim"] == 5
    bad = client.post("/v1/collections/brain/model/train", json={"dim": 0}, headers=auth())
    assert bad.status_code == 422
    status = client.get("/v1/collections/brain/model", headers=auth()).json()
    assert status["indexing_version"] is None and status["n_vectors"] == 0


def test_gateway_refuses_to_start_on_a_store_without_conditional_writes(tmp_path):
    settings = GatewaySettings(token_secret=TOKEN_SECRET.decode())
    with pytest.raises(UnsupportedStore, match="If-None-Match"):
        create_app(settings, store=OverwritingStore(tmp_path), dispatcher=RecordingDispatcher())


def test_openapi_contract_is_under_v1(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert all(p.startswith("/v1/") or p == "/healthz" for p in paths)
    assert "/v1/collections/{collection}/search" in paths
