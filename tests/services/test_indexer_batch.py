"""The GPU worker's batch task without Celery: one feature computation per batch, exactly one
record per image, redelivery-safe, poison isolated; and the re-index fan-out to its queue.

The torch back end runs on the CPU here (CI has no GPU); without torch the numpy one is used,
and the batch logic is tested all the same.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.records import FeatureRecord
from pecbir_contracts.tasks import QUEUE_REINDEX_GPU, TASK_INDEX_BATCH, TASK_QUEUES
from pecbir_indexer import batch, work
from pecbir_indexer.runtime import Runtime
from pecbir_indexer.settings import IndexerSettings
from pecbir_platform.bus import InMemoryBus
from tests.services.helpers import labelled_set
from tests.services.test_indexer_search import SMALL, _put_image

LAYOUT = CollectionLayout("hosp-a", "brain")
BACKEND = "torch" if importlib.util.find_spec("torch") else "numpy"


@pytest.fixture
def trained(store):
    settings = IndexerSettings(feature_backend=BACKEND, feature_device="cpu", reindex_chunk=4)
    rt = Runtime(settings, store, InMemoryBus())
    images, masks, labels = labelled_set(12)
    ids = [
        _put_image(store, (im // 16).astype(np.uint8), m, lab)
        for im, m, lab in zip(images, masks, labels, strict=True)
    ]
    store.put(LAYOUT.train_request("v0001"), SMALL.model_dump_json().encode())
    manifest = work.train_model(rt, "hosp-a", "brain", "v0001")
    return rt, ids, manifest


def test_batch_indexes_each_image_once_and_matches_the_reference(trained, store):
    rt, ids, manifest = trained
    assert manifest.feature_backend == ("torch:cpu" if BACKEND == "torch" else "numpy")
    outcome = batch.index_batch(rt, "hosp-a", "brain", "v0001", ids)
    assert sorted(outcome.indexed) == sorted(ids) and not outcome.poison
    reference = Runtime(IndexerSettings(), store, InMemoryBus()).model(LAYOUT, "v0001")
    assert reference.backend == "numpy"
    for image_id in ids:
        record = FeatureRecord.from_bytes(store.get(LAYOUT.features("v0001", image_id)))
        _, cipher, mask = work.load_image(rt, LAYOUT, image_id)
        expected = reference.project(reference.fisher_vectors([cipher], [mask]))[0]
        # CFML's scale is arbitrary (10³–10⁴ here): the same relative bound as the pecore test
        np.testing.assert_allclose(
            record.vector, expected, rtol=0, atol=1e-3 * float(np.abs(expected).max())
        )
    vectors = [e for _, e in rt.bus.read("0-0", block_ms=0, count=10_000) if e.kind == "vector"]
    assert sorted(e.image_id for e in vectors) == sorted(ids)
    # a redelivered batch computes nothing, writes nothing, publishes every vector again
    keys = sorted(store.list(LAYOUT.features_prefix("v0001")))
    again = batch.index_batch(rt, "hosp-a", "brain", "v0001", ids)
    assert again.indexed == [] and sorted(again.already_indexed) == sorted(ids)
    assert sorted(store.list(LAYOUT.features_prefix("v0001"))) == keys
    republished = rt.bus.read("0-0", block_ms=0, count=10_000)
    assert sum(e.kind == "vector" for _, e in republished) == 2 * len(ids)


def test_a_partly_done_batch_completes_and_poison_is_isolated(trained, store):
    rt, ids, _ = trained
    batch.index_batch(rt, "hosp-a", "brain", "v0001", ids[:5])  # a crash after 5 of them
    store.put(LAYOUT.mask(ids[7]), b"not a png")  # a corrupted stored object
    missing = "f" * 32
    outcome = batch.index_batch(rt, "hosp-a", "brain", "v0001", [*ids, missing])
    assert sorted(outcome.already_indexed) == sorted(ids[:5])
    assert sorted(outcome.indexed) == sorted(i for i in ids[5:] if i != ids[7])
    assert set(outcome.poison) == {ids[7], missing}
    assert "missing" in outcome.poison[missing]


def test_reindex_fans_out_gpu_batches_on_their_own_queue(trained, monkeypatch):
    from pecbir_indexer import runtime, tasks

    rt, ids, _ = trained
    sent: list[tuple[str, list]] = []
    for task in (tasks.index_batch, tasks.index_chunk):
        monkeypatch.setattr(
            task, "apply_async", lambda args, _name=task.name: sent.append((_name, args))
        )
    monkeypatch.setattr(runtime, "_runtime", rt)
    assert TASK_QUEUES[TASK_INDEX_BATCH] == QUEUE_REINDEX_GPU
    assert tasks.reindex_collection.run("hosp-a", "brain", "v0001") == 3  # chunks of 4
    assert {name for name, _ in sent} == {tasks.index_chunk.name}
    sent.clear()
    rt.settings.reindex_gpu_batch = 5
    assert tasks.reindex_collection.run("hosp-a", "brain", "v0001") == 3  # 5 + 5 + 2
    assert [len(args[3]) for _, args in sent] == [5, 5, 2]
    assert {name for name, _ in sent} == {TASK_INDEX_BATCH}
    assert sorted(i for _, args in sent for i in args[3]) == sorted(ids)


def test_a_batch_too_big_for_the_device_is_halved_until_it_fits(trained, store, monkeypatch):
    torch = pytest.importorskip("torch", reason="the [gpu] extra (torch) is not installed")
    rt, ids, _ = trained
    pipeline = rt.model(LAYOUT, "v0001")
    real = pipeline.transform
    sizes: list[int] = []

    def transform(images, masks):
        sizes.append(len(images))
        if len(images) > 3:  # the device's memory holds at most 3 of these images
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(images, masks)

    monkeypatch.setattr(pipeline, "transform", transform)
    outcome = batch.index_batch(rt, "hosp-a", "brain", "v0001", ids)
    assert sorted(outcome.indexed) == sorted(ids) and not outcome.poison
    assert sizes[0] == len(ids) and max(s for s in sizes if s <= 3) == 3
    assert sum(s for s in sizes if s <= 3) == len(ids)  # every image computed exactly once
    for image_id in ids:
        record = FeatureRecord.from_bytes(store.get(LAYOUT.features("v0001", image_id)))
        _, cipher, mask = work.load_image(rt, LAYOUT, image_id)
        expected = real([cipher], [mask])[0]
        np.testing.assert_allclose(
            record.vector, expected, rtol=0, atol=1e-3 * float(np.abs(expected).max())
        )
