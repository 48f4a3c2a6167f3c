"""Indexer work and the search engine without HTTP: idempotency, poison, swap, restart."""

from __future__ import annotations

import numpy as np
import pytest

from pecbir_contracts.events import ModelEvent, VectorEvent
from pecbir_contracts.layout import CollectionLayout, new_image_id
from pecbir_contracts.png import encode_png
from pecbir_contracts.records import FeatureRecord, read_current_version
from pecbir_contracts.schemas import ImageMetadata, TrainRequest
from pecbir_indexer import work
from pecbir_indexer.runtime import Runtime
from pecbir_indexer.settings import IndexerSettings
from pecbir_platform.bus import InMemoryBus
from pecbir_search.engine import SearchEngine
from pecbir_search.index import ExactVectorIndex as VectorIndex
from tests.services.helpers import labelled_set

LAYOUT = CollectionLayout("hosp-a", "brain")
SMALL = TrainRequest(
    n_components=4, n_regions=2, patch_size=5, radius=2, n_train_patches=2000, dim=2
)


def _put_image(store, image, mask, label):
    image_id = new_image_id()
    meta = ImageMetadata(
        opaque_id=f"opaque-{image_id[:12]}",
        label=label,
        height=image.shape[0],
        width=image.shape[1],
        key={"counter": 0, "check": "sha256:0123456789abcdef"},
    )
    store.put(LAYOUT.cipher(image_id), encode_png(image))
    store.put(LAYOUT.mask(image_id), encode_png(mask))
    store.put(LAYOUT.meta(image_id), meta.model_dump_json().encode())
    return image_id


@pytest.fixture
def runtime(store) -> Runtime:
    return Runtime(IndexerSettings(reindex_chunk=4), store, InMemoryBus())


@pytest.fixture
def trained(runtime):
    images, masks, labels = labelled_set(12)
    ids = [
        _put_image(runtime.store, (im // 16).astype(np.uint8), m, lab)
        for im, m, lab in zip(images, masks, labels, strict=True)
    ]
    runtime.store.put(LAYOUT.train_request("v0001"), SMALL.model_dump_json().encode())
    manifest = work.train_model(runtime, "hosp-a", "brain", "v0001")
    return ids, manifest


def test_index_before_training_waits_and_training_needs_two_classes(runtime):
    images, masks, _ = labelled_set(3)
    image_id = _put_image(runtime.store, (images[0] // 16).astype(np.uint8), masks[0], 1)
    assert work.index_image(runtime, "hosp-a", "brain", image_id).state == "awaiting_model"
    runtime.store.put(LAYOUT.train_request("v0001"), SMALL.model_dump_json().encode())
    with pytest.raises(work.PoisonMessage, match="two classes"):
        work.train_model(runtime, "hosp-a", "brain", "v0001")
    assert read_current_version(runtime.store, LAYOUT) is None


def test_train_then_index_is_idempotent_and_publishes(runtime, trained):
    ids, manifest = trained
    assert manifest.n_templates == 12 and manifest.projected_dim == 2
    assert read_current_version(runtime.store, LAYOUT) == "v0001"
    plan = work.reindex_plan(runtime, "hosp-a", "brain", "v0001")
    assert [len(c) for c in plan] == [4, 4, 4] and sorted(i for c in plan for i in c) == sorted(ids)
    first = work.index_image(runtime, "hosp-a", "brain", ids[0])
    again = work.index_image(runtime, "hosp-a", "brain", ids[0])
    assert (first.state, again.state) == ("indexed", "already_indexed")
    record = FeatureRecord.from_bytes(runtime.store.get(LAYOUT.features("v0001", ids[0])))
    assert record.vector.dtype == np.float32 and record.vector.shape == (2,)
    assert record.label in (1, 2, 3)
    events = runtime.bus.read("0-0", block_ms=0)
    vectors = [e for _, e in events if isinstance(e, VectorEvent)]
    assert len(vectors) == 2 and vectors[0].vector == vectors[1].vector
    assert any(isinstance(e, ModelEvent) for _, e in events)
    remaining = [i for c in work.reindex_plan(runtime, "hosp-a", "brain", "v0001") for i in c]
    assert ids[0] not in remaining and len(remaining) == len(ids) - 1


def test_corrupt_stored_image_is_poison(runtime, trained):
    ids, _ = trained
    runtime.store.put(LAYOUT.cipher(ids[0]), b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(work.PoisonMessage, match="unusable"):
        work.index_image(runtime, "hosp-a", "brain", ids[0])
    with pytest.raises(work.PoisonMessage, match="missing"):
        work.index_image(runtime, "hosp-a", "brain", new_image_id())


def test_celery_task_dead_letters_poison_and_retries_storage_errors(runtime, trained, monkeypatch):
    import json

    from pecbir_contracts.store import StorageError
    from pecbir_indexer import runtime as runtime_module
    from pecbir_indexer import tasks as indexer_app

    monkeypatch.setattr(runtime_module, "_runtime", runtime)
    indexer_app.use_eager_mode()
    ids, _ = trained
    runtime.store.put(LAYOUT.mask(ids[1]), b"not a png")
    indexer_app.index_image.apply(args=["hosp-a", "brain", ids[1]], throw=False)
    failure = json.loads(runtime.store.get(LAYOUT.failure(ids[1])))
    assert "unusable" in failure["reason"]
    # Storage errors are retried (autoretry) before they count as failures.
    calls = []
    real_put = runtime.store.put

    def flaky_put(key, data, content_type="application/octet-stream"):
        calls.append(key)
        if len(calls) == 1:
            raise StorageError("disk full (simulated)")
        return real_put(key, data, content_type)

    monkeypatch.setattr(runtime.store, "put", flaky_put)
    monkeypatch.setattr(indexer_app.IndexerTask, "retry_backoff", False)
    result = indexer_app.index_image.apply(args=["hosp-a", "brain", ids[2]], throw=False)
    assert result.successful(), result.traceback
    assert len(calls) == 2 and runtime.store.exists(LAYOUT.features("v0001", ids[2]))


def test_a_chunk_image_failing_under_its_version_is_tried_again_then_given_up(
    runtime, trained, monkeypatch
):
    """A re-index chunk (Celery, eager) with an image that cannot be indexed with the chunk's
    version: the others are indexed; it is queued again alone until `version_attempts`
    failures, then recorded as failed for that version only and announced to the search."""
    import json

    from pecbir_contracts.events import IndexFailedEvent
    from pecbir_indexer import runtime as runtime_module
    from pecbir_indexer import tasks as indexer_app

    monkeypatch.setattr(runtime_module, "_runtime", runtime)
    indexer_app.use_eager_mode()
    ids, _ = trained
    runtime.store.put(LAYOUT.mask(ids[1]), b"not a png")
    runs = []
    real = work.index_image
    monkeypatch.setattr(work, "index_image", lambda *args: runs.append(args[3]) or real(*args))
    result = indexer_app.index_chunk.apply(args=["hosp-a", "brain", "v0001", ids[:3]])
    assert result.successful(), result.traceback
    assert result.result == 2  # the two good images; the bad one's re-queues ran meanwhile
    attempts = runtime.settings.version_attempts
    assert runs.count(ids[1]) == attempts and runs.count(ids[0]) == runs.count(ids[2]) == 1
    assert runtime.store.exists(LAYOUT.features("v0001", ids[0]))
    assert runtime.store.exists(LAYOUT.features("v0001", ids[2]))
    failure = json.loads(runtime.store.get(LAYOUT.version_failure("v0001", ids[1])))
    assert "unusable" in failure["reason"] and f"({attempts} attempts)" in failure["reason"]
    assert not runtime.store.exists(LAYOUT.failure(ids[1]))  # other versions may index it
    events = [e for _, e in runtime.bus.read("0-0", 0) if isinstance(e, IndexFailedEvent)]
    assert [(e.version, e.image_id) for e in events] == [("v0001", ids[1])]
    # A re-index planned now leaves it out.
    planned = work.reindex_plan(runtime, "hosp-a", "brain", "v0001")
    assert ids[1] not in {i for chunk in planned for i in chunk}


def test_vector_index_top_k_is_exact_and_stable():
    rng = np.random.default_rng(0)
    index = VectorIndex("v0001", 3, capacity=2)
    vectors = rng.normal(size=(50, 3)).astype(np.float32)
    vectors[10] = vectors[20] = vectors[30] = vectors[0]  # ties
    for i, v in enumerate(vectors):
        index.upsert(f"id{i}", v, i % 3)
    ids, distances, labels = index.search(vectors[0], 4)
    assert list(labels) == [0, 1, 2, 0]
    assert ids == ["id0", "id10", "id20", "id30"] and np.all(distances == 0)
    ids, distances, _ = index.search(vectors[0] + 0.5, 50)
    expected = np.argsort(((vectors - (vectors[0] + 0.5)) ** 2).sum(1), kind="stable")
    assert ids == [f"id{i}" for i in expected]
    index.upsert("id5", vectors[5], 1)  # re-delivery does not add a row
    assert len(index) == 50
    with pytest.raises(ValueError, match="dims"):
        index.upsert("bad", np.zeros(4), None)


def test_engine_catches_up_after_restart_and_swaps_versions_atomically(runtime, trained):
    ids, _ = trained
    for image_id in ids:
        work.index_image(runtime, "hosp-a", "brain", image_id)
    # A restarted search service sees everything from the store alone.
    engine = SearchEngine(runtime.store, None)
    engine.catch_up_all()
    state = engine.collection("hosp-a", "brain")
    assert state.status().serving_version == "v0001" and state.status().n_vectors == len(ids)
    # Version 2: the engine keeps serving v0001 until v0002 holds as many vectors.
    runtime.store.put(
        LAYOUT.train_request("v0002"),
        SMALL.model_copy(update={"dim": 1}).model_dump_json().encode(),
    )
    work.train_model(runtime, "hosp-a", "brain", "v0002")
    engine.apply(ModelEvent(tenant="hosp-a", collection="brain", version="v0002"))
    assert (state.status().serving_version, state.status().pending_version) == ("v0001", "v0002")
    bus = runtime.bus
    start = bus.last_id()
    for image_id in ids[:-1]:
        work.index_image(runtime, "hosp-a", "brain", image_id, "v0002")
    for _, event in bus.read(start, block_ms=0):
        engine.apply(event)
    assert state.status().serving_version == "v0001"
    assert state.status().pending_vectors == len(ids) - 1
    start = bus.last_id()
    work.index_image(runtime, "hosp-a", "brain", ids[-1], "v0002")
    for _, event in bus.read(start, block_ms=0):
        engine.apply(event)
    status = state.status()
    assert (status.serving_version, status.n_vectors, status.pending_version) == (
        "v0002",
        len(ids),
        None,
    )
    assert state.serving.index.dim == 1
    # Old-version events arriving late are ignored.
    engine.apply(
        VectorEvent(
            tenant="hosp-a", collection="brain", version="v0001", image_id=ids[0], vector=[0.0, 0.0]
        )
    )
    assert state.status().serving_version == "v0002"


def test_engine_builds_its_indexes_with_the_factory_it_is_given(runtime, trained):
    from pecbir_search.index import ExactVectorIndex

    ids, manifest = trained
    for image_id in ids:
        work.index_image(runtime, "hosp-a", "brain", image_id)
    made: list[tuple[str, int]] = []

    def factory(version: str, dim: int) -> ExactVectorIndex:
        made.append((version, dim))
        return ExactVectorIndex(version, dim)

    engine = SearchEngine(runtime.store, None, index_factory=factory)
    assert engine.catch_up_all() == 1
    state = engine.collection("hosp-a", "brain")
    assert made == [("v0001", manifest.projected_dim)]
    assert len(state.serving.index) == len(ids)


@pytest.mark.parametrize(("scheme", "patch"), [("pe-roi-t16dn-in", 9), ("pe-roi-t16dn-in-p7", 7)])
def test_a_pe_roi_collection_trains_with_its_schemes_patch_size(runtime, scheme, patch):
    """The scheme's cloud mask holds the positions whose P×P patch lies inside one tile: a
    request at the default patch size trains with that P, a smaller one is kept, one wider
    than the owner's margin is refused; the cloud never dilates the owner's ROI."""
    import json

    runtime.store.put(LAYOUT.pe_roi, json.dumps({"scheme": scheme}).encode())
    default = work._pe_roi_params(runtime, LAYOUT, TrainRequest())
    assert (default.patch_size, default.radius) == (patch, 0)
    assert work._pe_roi_params(runtime, LAYOUT, SMALL).patch_size == 5
    with pytest.raises(work.PoisonMessage, match="at most 9"):
        work._pe_roi_params(runtime, LAYOUT, TrainRequest(patch_size=11))


def test_a_tile_reflected_pe_roi_collection_is_refused(runtime):
    """pe-roi-…-rf needs tile-reflected patches, which the indexer does not compute: it refuses
    the collection rather than train on plain patches."""
    import json

    runtime.store.put(LAYOUT.pe_roi, json.dumps({"scheme": "pe-roi-t16dn-rf"}).encode())
    with pytest.raises(work.PoisonMessage, match="tile-reflected"):
        work._pe_roi_params(runtime, LAYOUT, TrainRequest())
