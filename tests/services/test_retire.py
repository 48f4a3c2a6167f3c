"""Retiring an image in the cloud (issue 14): after a corrected DICOM SEG the owner's encryptor
retires the superseded version once the new one is searchable; the gateway marks it retired,
the search service drops its vector (also after a restart, and against a late vector), a new
training leaves it out; only the owner may retire."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pecbir_contracts.events import VectorEvent
from pecbir_contracts.layout import CollectionLayout, image_id_for
from pecbir_contracts.records import FeatureRecord, read_current_version
from pecbir_contracts.routes import SEARCH_IMAGE, SEARCH_KNN
from pecbir_encryptor.janitor import PendingJanitor
from pecbir_harness.embedded import EmbeddedSystem
from pecbir_search.engine import SearchEngine
from pecore.keys import MasterKey
from tests.services.helpers import (
    SMALL_MODEL,
    dicom_bytes,
    labelled_set,
    make_seg,
    mr_with_seg,
    multipart_related,
    npy_bytes,
)

N_SEED = 18


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    root = tmp_path_factory.mktemp("retire")
    with EmbeddedSystem(
        root,
        master=MasterKey.from_seed(19),
        shared_collections="hospital-a/brain=hospital-b",
        template_collections=frozenset({"brain"}),  # a PACS push is a training template here
    ) as running:
        images, masks, labels = labelled_set(N_SEED, seed=7)
        for image, mask, label in zip(images, masks, labels, strict=True):
            answer = running.encryptor.post(
                "/v1/collections/brain/images",
                files={"image": ("x.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
                data={"label": str(label), "train": "true"},
            )
            assert answer.status_code == 202, answer.text
        trained = running.gateway.post("/v1/collections/brain/model/train", json=SMALL_MODEL)
        assert trained.status_code == 202, trained.text
        running.wait_searchable("brain", N_SEED)
        yield running


def _stow(system, datasets) -> int:
    body, content_type = multipart_related([dicom_bytes(d) for d in datasets])
    answer = system.encryptor.post(
        "/dicomweb/brain/studies", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code in (200, 202), answer.text
    return answer.status_code


def _search_headers(system) -> dict[str, str]:
    return {"authorization": f"Bearer {system.search_token()}"}


def _held(system, image_id: str) -> bool:
    answer = system.search.get(
        SEARCH_IMAGE.format(collection="brain", image_id=image_id),
        params={"owner": system.tenant},
        headers=_search_headers(system),
    )
    return answer.status_code == 200


def _vector(system, image_id: str) -> np.ndarray:
    layout = CollectionLayout(system.tenant, "brain")
    version = read_current_version(system.store, layout)
    return FeatureRecord.from_bytes(system.store.get(layout.features(version, image_id))).vector


def _knn_ids(system, vector: np.ndarray) -> list[str]:
    answer = system.search.post(
        SEARCH_KNN.format(collection="brain"),
        params={"owner": system.tenant},
        json={"vector": [float(v) for v in vector], "k": 100},
        headers=_search_headers(system),
    )
    assert answer.status_code == 200, answer.text
    return [hit["image_id"] for hit in answer.json()["hits"]]


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def corrected(system):
    """An image + SEG, then a corrected SEG: (old cloud id, new cloud id), after the sweep."""
    image, seg, _, mask = mr_with_seg(701)
    assert _stow(system, [image, seg]) == 200
    encryptor = system.encryptor_app.state.encryptor
    old_id = image_id_for(system.tenant, "brain", encryptor.opaque_id_for(image.SOPInstanceUID))
    system.wait_searchable("brain", N_SEED + 1)
    assert _stow(system, [make_seg(np.roll(mask, 4, axis=0), image, label="glioma")]) == 202
    system.wait_searchable("brain", N_SEED + 2)  # the new version is indexed: both are held
    old_vector = _vector(system, old_id)
    # Nobody searches: the encryptor's housekeeping completes the correction in the cloud.
    PendingJanitor(encryptor, ttl_s=None, interval_s=3600).sweep()
    new_id = encryptor.image_id_of("brain", image.SOPInstanceUID)
    assert new_id != old_id
    return old_id, new_id, old_vector


def test_the_old_version_is_retired_in_the_cloud_and_never_found(system, corrected):
    old_id, new_id, old_vector = corrected
    status = system.gateway.get(f"/v1/collections/brain/images/{old_id}/status").json()
    assert status["state"] == "retired" and new_id in status["detail"]
    _wait(lambda: not _held(system, old_id))
    assert _held(system, new_id)
    # Even queried with its own vector, the cloud's index never returns the old version.
    hits = _knn_ids(system, old_vector)
    assert old_id not in hits and new_id in hits
    assert system.wait_searchable("brain", N_SEED + 1)["n_vectors"] == N_SEED + 1
    audit = (system.root / "encryptor-audit.jsonl").read_text()
    assert '"action": "retire"' in audit and old_id in audit


def test_a_late_vector_and_a_restarted_search_service_keep_it_out(system, corrected):
    old_id, _, old_vector = corrected
    layout = CollectionLayout(system.tenant, "brain")
    version = read_current_version(system.store, layout)
    system.engine.apply(
        VectorEvent(
            tenant=system.tenant, collection="brain", version=version, image_id=old_id,
            label=2, vector=[float(v) for v in old_vector],
        )
    )  # fmt: skip
    assert not _held(system, old_id)
    restarted = SearchEngine(system.store, bus=None)
    state = restarted.collection(system.tenant, "brain")
    assert old_id not in state.serving.index and len(state.serving.index) == N_SEED + 1


def test_a_new_training_leaves_the_retired_version_out(system, corrected):
    old_id, new_id, _ = corrected
    trained = system.gateway.post("/v1/collections/brain/model/train", json=SMALL_MODEL)
    assert trained.status_code == 202, trained.text
    version = trained.json()["version"]
    layout = CollectionLayout(system.tenant, "brain")
    _wait(lambda: system.store.exists(layout.manifest(version)), timeout=120)
    manifest = json.loads(system.store.get(layout.manifest(version)))
    # 18 seed templates + the new version; the old one is not a template any more.
    assert manifest["n_templates"] == N_SEED + 1
    status = system.wait_searchable("brain", N_SEED + 1, timeout=120)
    assert status["serving_version"] == version
    assert not system.store.exists(layout.features(version, old_id))
    assert system.store.exists(layout.features(version, new_id))
    assert not _held(system, old_id)


def test_only_the_owner_may_retire(system, corrected):
    _, new_id, _ = corrected
    path = f"/v1/collections/brain/images/{new_id}"
    # Another hospital the collection is shared with (read and search only): 403.
    other = system.cloud_token(tenant="hospital-b")
    refused = system.gateway.delete(
        path, params={"owner": system.tenant}, headers={"authorization": f"Bearer {other}"}
    )
    assert refused.status_code == 403, refused.text
    # Its own tenant has no such image: 404, nothing retired anywhere.
    missing = system.gateway.delete(path, headers={"authorization": f"Bearer {other}"})
    assert missing.status_code == 404
    # The owner's token without scope upload: 403.
    reader = system.cloud_token(scopes=("read", "search"))
    assert (
        system.gateway.delete(path, headers={"authorization": f"Bearer {reader}"}).status_code
        == 403
    )
    # A bad id: 422; an unknown one: 404.
    assert system.gateway.delete("/v1/collections/brain/images/not-an-id").status_code == 422
    assert system.gateway.delete(f"/v1/collections/brain/images/{'0' * 32}").status_code == 404
    assert system.gateway.get(f"{path}/status").json()["state"] == "searchable"
    assert _held(system, new_id)


def test_retiring_again_answers_the_same(system, corrected):
    old_id, _, _ = corrected
    layout = CollectionLayout(system.tenant, "brain")
    marker = system.store.get(layout.retired(old_id))
    again = system.gateway.request(
        "DELETE", f"/v1/collections/brain/images/{old_id}", json={"reason": "again"}
    )
    assert again.status_code == 202 and again.json()["state"] == "retired"
    assert system.store.get(layout.retired(old_id)) == marker  # the first reason stays
