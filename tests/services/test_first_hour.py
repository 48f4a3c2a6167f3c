"""What a new user meets first (issue 11): health that tells outsiders nothing, an upload's
`status_url` that works where the upload was made, refused input that leaves nothing behind."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from pecbir_harness.embedded import EmbeddedSystem
from pecore.keys import MasterKey
from tests.services.helpers import SMALL_MODEL, labelled_set, npy_bytes


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with EmbeddedSystem(tmp_path_factory.mktemp("first-hour"), master=MasterKey.from_seed(3)) as s:
        yield s


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unauthenticated_health_says_only_ok_on_every_service(system):
    clients = {"encryptor": system.encryptor, "gateway": system.gateway, "search": system.search}
    for name, client in clients.items():
        bare = client.get("/healthz", headers={"authorization": ""})
        assert bare.status_code == 200 and bare.json() == {"status": "ok"}, name
        forged = client.get("/healthz", headers={"authorization": "Bearer x.y.z"})
        assert forged.status_code == 401, name
    # With the service's own token: the details (where the data is, which key).
    details = system.encryptor.get("/healthz").json()
    assert set(details) == {"status", "tenant", "key_id", "pending"}  # pending: issue 14
    assert "store" in system.gateway.get("/healthz").json()
    search_token = {"authorization": f"Bearer {system.search_token()}"}
    assert "events_applied" in system.search.get("/healthz", headers=search_token).json()


def test_the_status_url_of_an_encryptor_upload_works_on_the_encryptor(system):
    images, masks, _ = labelled_set(1, shape=(48, 48), seed=11)
    files = {"image": ("x.npy", npy_bytes(images[0])), "mask": ("m.npy", npy_bytes(masks[0]))}
    answer = system.encryptor.post("/v1/collections/status/images", files=files)
    assert answer.status_code == 202, answer.text
    status_url = answer.json()["upload"]["status_url"]
    status = system.encryptor.get(status_url)
    assert status.status_code == 200, status.text
    assert status.json()["image_id"] == answer.json()["upload"]["image_id"]
    assert status.json()["state"] == "awaiting_model"  # no model trained in this collection
    assert system.gateway.get(status_url).json() == status.json()
    missing = system.encryptor.get(status_url.replace(status.json()["image_id"], "0" * 32))
    assert missing.status_code == 404


@pytest.mark.parametrize("part", ["image", "mask"])
def test_a_palette_png_is_refused_and_leaves_nothing_in_the_store(system, part):
    images, masks, _ = labelled_set(1, shape=(48, 48), seed=12)
    good = {
        "image": _png(images[0].astype(np.uint8)),
        "mask": _png(masks[0].astype(np.uint8) * 255),
    }
    before = system.store.list("")
    files = {name: (f"{name}.png", data) for name, data in good.items()}
    files[part] = (f"{part}.png", _png(np.asarray(Image.open(io.BytesIO(good[part]))), "P"))
    answer = system.encryptor.post("/v1/collections/palette/images", files=files)
    assert answer.status_code == 422 and "mode P" in answer.json()["detail"], answer.text
    assert system.store.list("") == before


@pytest.mark.parametrize("service", ["encryptor", "gateway", "search"])
def test_docs_work_offline_and_every_operation_is_described_with_its_errors(system, service):
    client = getattr(system, service)
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert assets and all(url.startswith("/docs/assets/") for url in assets), assets
    for url in assets:
        assert client.get(url).status_code == 200, url
    # ReDoc (CDN only) is removed: no route; the request guard answers 401 before routing.
    assert "/redoc" not in {getattr(route, "path", None) for route in client.app.routes}
    document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{service} {method.upper()} {path}"
            assert operation.get("description"), f"{where}: no description"
            errors = {c: r for c, r in operation["responses"].items() if c[0] in "45"}
            assert errors, f"{where}: no error response"
            for code, response in errors.items():
                if code == "422" and "HTTPValidationError" in str(response):
                    continue  # FastAPI's own, with its schema
                example = response["content"]["application/json"]["example"]
                assert example["detail"], f"{where} {code}: no example"
            if path.startswith("/v1/collections"):
                assert {"401", "403", "503"} <= set(errors), where
    stow = document["paths"].get("/dicomweb/{collection}/studies", {}).get("post")
    if stow is not None:
        assert 'multipart/related; type="application/dicom"' in stow["requestBody"]["content"]


def test_the_same_images_give_the_same_model_whatever_ids_they_get(system):
    """`make demo` twice gives one mAP: training samples in the owner's pseudonym order, not
    in the order of the image ids the gateway draws at random."""
    from pecbir_contracts.layout import CollectionLayout

    images, masks, labels = labelled_set(12, shape=(48, 48), seed=21)
    models = []
    for collection, order in (("same-a", range(12)), ("same-b", reversed(range(12)))):
        for i in order:
            files = {
                "image": ("x.npy", npy_bytes(images[i])),
                "mask": ("m.npy", npy_bytes(masks[i])),
            }
            answer = system.encryptor.post(
                f"/v1/collections/{collection}/images",
                files=files,
                data={"label": labels[i], "train": "true"},
            )
            assert answer.status_code == 202, answer.text
        trained = system.gateway.post(
            f"/v1/collections/{collection}/model/train", json={**SMALL_MODEL, "random_state": 0}
        )
        assert trained.status_code == 202, trained.text
        version = system.wait_searchable(collection, 12)["serving_version"]
        models.append(system.store.get(CollectionLayout(system.tenant, collection).model(version)))
    assert models[0] == models[1]
