"""Index a batch of images with one feature computation (the GPU worker's work, issue 17).

The same outcome per image as `work.index_image` — a feature record written once, a vector
event published (again on a redelivery) — but the Fisher vectors of the whole batch come from
one `CBIRPipeline.fisher_vectors` call, which the torch back end runs as batched device work.
Store reads and writes run on a few threads so that the device does not wait on one object at
a time. Idempotent like every indexer step: images that already have a record are not computed
again, so a batch redelivered after a crash completes what is missing.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pecbir_contracts.events import VectorEvent
from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.records import FeatureRecord
from pecbir_contracts.store import ObjectNotFound
from pecbir_indexer.runtime import Runtime
from pecbir_indexer.work import PoisonMessage, load_image

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    indexed: list[str] = field(default_factory=list)
    already_indexed: list[str] = field(default_factory=list)
    # image id -> why it cannot be indexed (dead-lettered by the task)
    poison: dict[str, str] = field(default_factory=dict)


def index_batch(
    rt: Runtime, tenant: str, collection: str, version: str, image_ids: list[str]
) -> BatchOutcome:
    layout = CollectionLayout(tenant, collection)
    outcome = BatchOutcome()
    threads = max(1, rt.settings.batch_io_threads)
    with ThreadPoolExecutor(threads) as pool:
        # the threads only fetch: np.load parses a record's header with `ast`, which CPython
        # 3.11 before 3.11.8 cannot run in two threads at once (gh-106905)
        stored = list(pool.map(lambda i: _stored(rt, layout.features(version, i)), image_ids))
        records = {
            image_id: None if data is None else FeatureRecord.from_bytes(data)
            for image_id, data in zip(image_ids, stored, strict=True)
        }
        todo = [image_id for image_id, record in records.items() if record is None]
        outcome.already_indexed = [i for i in image_ids if records[i] is not None]
        loaded = {}
        for image_id, result in zip(
            todo, pool.map(lambda i: _load(rt, layout, i), todo), strict=True
        ):
            if isinstance(result, PoisonMessage):
                outcome.poison[image_id] = str(result)
            else:
                loaded[image_id] = result
        computed = _features(rt, layout, version, loaded, outcome)
        for image_id, record in computed.items():
            records[image_id] = record
        list(
            pool.map(
                lambda item: rt.store.put(layout.features(version, item[0]), item[1].to_bytes()),
                computed.items(),
            )
        )
    outcome.indexed = list(computed)
    # Publishing again on a redelivery is harmless: the search service upserts by image id.
    for image_id in image_ids:
        record = records.get(image_id)
        if record is not None:
            rt.bus.publish(
                VectorEvent(
                    tenant=tenant,
                    collection=collection,
                    version=version,
                    image_id=image_id,
                    label=record.label,
                    vector=[float(v) for v in record.vector],
                )
            )
    return outcome


def _stored(rt: Runtime, key: str) -> bytes | None:
    try:
        return rt.store.get(key)
    except ObjectNotFound:
        return None


def _load(rt: Runtime, layout: CollectionLayout, image_id: str):
    try:
        return load_image(rt, layout, image_id)
    except PoisonMessage as exc:
        return exc


def _features(
    rt: Runtime,
    layout: CollectionLayout,
    version: str,
    loaded: dict[str, tuple],
    outcome: BatchOutcome,
) -> dict[str, FeatureRecord]:
    """Feature records of the loaded images: one batched call; if it fails, image by image,
    so that a bad image is found (and reported as poison) and the others still get indexed."""
    if not loaded:
        return {}
    pipeline = rt.model(layout, version)

    def compute(ids: list[str]) -> dict[str, FeatureRecord]:
        # transform, not project(fisher_vectors): on a device the Fisher vectors stay there
        vectors = pipeline.transform([loaded[i][1] for i in ids], [loaded[i][2] for i in ids])
        return {
            image_id: FeatureRecord(version, vectors[k], loaded[image_id][0].label)
            for k, image_id in enumerate(ids)
        }

    def compute_fitting(ids: list[str]) -> dict[str, FeatureRecord]:
        """`compute`, halving the batch while the device runs out of memory (a batch sized for
        one card or one image mix can exceed another's); one image that does not fit fails."""
        try:
            return compute(ids)
        except RuntimeError as exc:
            if not _out_of_device_memory(exc) or len(ids) == 1:
                raise
        log.warning("device out of memory on a batch of %d images; halving it", len(ids))
        _release_device_cache()
        half = len(ids) // 2
        return {**compute_fitting(ids[:half]), **compute_fitting(ids[half:])}

    try:
        return compute_fitting(list(loaded))
    except ValueError:
        log.warning(
            "batch feature extraction failed; retrying its %d images one by one", len(loaded)
        )
    records = {}
    for image_id in loaded:
        try:
            records.update(compute_fitting([image_id]))
        except ValueError as exc:
            outcome.poison[image_id] = f"feature extraction failed for {image_id}: {exc}"
    return records


def _out_of_device_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (a RuntimeError), recognised without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError"


def _release_device_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
