"""Uploads during a re-index (issue 15): searchable under the serving version before the swap,
present exactly once after it; the janitor's snapshots make a search start-up read one object
per version instead of one per record.

Real parts: a private redis-server (the event stream the search service follows, and the
reconciler's leases), the filesystem store, the indexer's work and janitor pass, the search
engine following the stream in its thread.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from pecbir_contracts.png import decode_image_png
from pecbir_contracts.records import (
    FeatureRecord,
    FeatureSnapshot,
    live_versions,
    read_indexed_version,
)
from pecbir_contracts.tasks import TASK_INDEX_CHUNK
from pecbir_indexer import work
from pecbir_indexer.recovery import RedisLeases, sweep
from pecbir_indexer.runtime import Runtime
from pecbir_indexer.settings import IndexerSettings
from pecbir_platform.store import FilesystemStore
from pecbir_search.engine import SearchEngine
from tests.services.helpers import labelled_set
from tests.services.test_indexer_search import LAYOUT, SMALL, _put_image

TENANT, COLLECTION = LAYOUT.tenant, LAYOUT.collection
BOUND = 30.0
SETTINGS = IndexerSettings(
    reindex_chunk=4, redelivery_bound_s=BOUND, debris_grace_s=600.0, snapshot_min_records=4
)


@pytest.fixture
def redis_url(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary: the event stream cannot be tested")
    from pecbir_harness.procs import RedisProcess

    server = RedisProcess(tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def cluster(store, redis_url):
    import redis

    from pecbir_platform.bus import RedisBus

    runtime = Runtime(SETTINGS, store, RedisBus(redis_url))
    return runtime, RedisLeases(redis.Redis.from_url(redis_url))


class Sent(list):
    def __call__(self, task_name: str, args) -> None:
        self.append((task_name, tuple(args)))


def _upload(store, seed: int, n: int = 1) -> list[str]:
    images, masks, labels = labelled_set(n, seed=seed)
    return [
        _put_image(store, (im // 16).astype(np.uint8), m, lab)
        for im, m, lab in zip(images, masks, labels, strict=True)
    ]


def _train(runtime: Runtime, version: str, dim: int = 2) -> None:
    request = SMALL.model_copy(update={"dim": dim}).model_dump_json().encode()
    runtime.store.put(LAYOUT.train_request(version), request)
    work.train_model(runtime, TENANT, COLLECTION, version)


def _reindex(runtime: Runtime, version: str, chunks: list[list[str]]) -> None:
    for chunk in chunks:  # what the index_chunk tasks do
        for image_id in chunk:
            work.index_image(runtime, TENANT, COLLECTION, image_id, version)


def _until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


def _served(engine: SearchEngine):
    state = engine.collection(TENANT, COLLECTION)
    return state.serving, state.pending


def test_an_upload_during_a_reindex_is_served_at_once_and_held_once_after_the_swap(
    cluster, redis_url
):
    runtime, leases = cluster
    store, sent = runtime.store, Sent()
    seeded = _upload(store, seed=1, n=12)
    _train(runtime, "v0001")
    _reindex(runtime, "v0001", work.reindex_plan(runtime, TENANT, COLLECTION, "v0001"))
    assert sweep(store, sent, leases, SETTINGS).indexed_versions == ["v0001"]
    assert live_versions(store, LAYOUT) == ["v0001"]

    engine = SearchEngine(store, runtime.bus)
    engine.start()
    try:
        _until(lambda: len(_served(engine)[0].index) == 12, "v0001 serves the seeded images")
        # A new version is trained; its re-index is half done when an image is uploaded.
        _train(runtime, "v0002", dim=1)
        chunks = work.reindex_plan(runtime, TENANT, COLLECTION, "v0002")
        _reindex(runtime, "v0002", chunks[: len(chunks) // 2])
        assert live_versions(store, LAYOUT) == ["v0001", "v0002"]
        (upload,) = _upload(store, seed=2)
        outcome = work.index_image(runtime, TENANT, COLLECTION, upload)
        assert (outcome.state, outcome.versions) == ("indexed", ("v0001", "v0002"))

        def upload_in_both() -> bool:
            serving, pending = _served(engine)
            return pending is not None and upload in serving.index and upload in pending.index

        _until(upload_in_both, "the upload reaches the serving and the pending version")
        serving, pending = _served(engine)
        assert (serving.name, pending.name) == ("v0001", "v0002")  # no swap before the end
        assert len(serving.index) == 13 and len(pending.index) < 13
        record = FeatureRecord.from_bytes(store.get(LAYOUT.features("v0001", upload)))
        ids, _, _ = serving.index.search(record.vector, 1)
        assert ids == [upload]  # a query finds it under the serving version

        # A search service (re)started now serves v0001 with the upload, v0002 pending.
        restarted = SearchEngine(store, None)
        assert restarted.catch_up_all() == 1
        serving_r, pending_r = _served(restarted)
        assert (serving_r.name, pending_r.name) == ("v0001", "v0002")
        assert upload in serving_r.index and len(serving_r.index) == 13

        # The janitor: v0002 is not complete; the images it lacks wait in re-index chunks
        # queued in Redis, so they are not queued again one by one (they would queue ahead of
        # new uploads). An upload whose task was lost is queued again.
        from pecbir_gateway.dispatch import CeleryDispatcher

        broker = CeleryDispatcher(redis_url)
        for chunk in chunks[len(chunks) // 2 :]:
            broker.send(TASK_INDEX_CHUNK, [TENANT, COLLECTION, "v0002", chunk])
        (lost,) = _upload(store, seed=7)
        report = sweep(store, sent, leases, SETTINGS, now=time.time() + BOUND + 1)
        assert report.indexed_versions == [] and report.requeued_images == [lost]
        assert report.queued_behind == sum(len(c) for c in chunks[len(chunks) // 2 :])
        assert read_indexed_version(store, LAYOUT) == "v0001"
        work.index_image(runtime, TENANT, COLLECTION, lost)  # the task queued again

        _reindex(runtime, "v0002", chunks[len(chunks) // 2 :])

        def swapped() -> bool:
            serving, pending = _served(engine)
            return serving.name == "v0002" and pending is None

        _until(swapped, "the swap to v0002")
        serving, _ = _served(engine)
        held = serving.index.ids()
        assert sorted(held) == sorted([*seeded, upload, lost]) and held.count(upload) == 1
        assert serving.index.dim == 1

        # Once the janitor sees v0002 complete, uploads are indexed with it alone.
        assert sweep(store, sent, leases, SETTINGS).indexed_versions == ["v0002"]
        (later,) = _upload(store, seed=3)
        assert work.index_image(runtime, TENANT, COLLECTION, later).versions == ("v0002",)
        _until(lambda: later in _served(engine)[0].index, "the later upload is served")
        assert len(_served(engine)[0].index) == 15
    finally:
        engine.stop()


def test_uploads_reach_the_served_version_when_a_newer_one_was_trained_before_it_finished(
    store,
):
    """v0002 is trained while v0001 serves; v0003 before v0002's re-index ended: a search
    service keeps serving v0001, so an upload goes to v0001, v0002 and v0003."""
    from pecbir_contracts.records import write_current_version, write_indexed_version

    for version in ("v0001", "v0002", "v0003"):
        store.put(LAYOUT.manifest(version), b"{}")
    write_current_version(store, LAYOUT, "v0003")
    assert live_versions(store, LAYOUT) == ["v0002", "v0003"]  # earlier release: no marker
    write_indexed_version(store, LAYOUT, "v0001")
    assert live_versions(store, LAYOUT) == ["v0001", "v0002", "v0003"]
    write_indexed_version(store, LAYOUT, "v0003")
    assert not write_indexed_version(store, LAYOUT, "v0002")  # never backwards
    assert live_versions(store, LAYOUT) == ["v0003"]


class CountingStore(FilesystemStore):
    """The filesystem store, counting reads of feature records."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.record_reads = 0

    def get(self, key: str) -> bytes:
        if "/features/" in key:
            self.record_reads += 1
        return super().get(key)


def test_search_starts_from_the_snapshot_and_reads_only_the_records_it_lacks(tmp_path, redis_url):
    import redis

    from pecbir_platform.bus import InMemoryBus

    store = CountingStore(tmp_path / "store")
    runtime = Runtime(SETTINGS, store, InMemoryBus())
    leases = RedisLeases(redis.Redis.from_url(redis_url))
    _upload(store, seed=4, n=12)
    _train(runtime, "v0001")
    _reindex(runtime, "v0001", work.reindex_plan(runtime, TENANT, COLLECTION, "v0001"))
    before = SearchEngine(store, None)
    store.record_reads = 0
    before.catch_up_all()
    assert store.record_reads == 12  # no snapshot yet: one read per record

    report = sweep(store, Sent(), leases, SETTINGS)
    assert report.snapshots == {LAYOUT.features_snapshot("v0001"): 12}
    snapshot = FeatureSnapshot.from_bytes(store.get(LAYOUT.features_snapshot("v0001")))
    assert sorted(snapshot.ids) == sorted(_served(before)[0].index.ids())
    # Three more uploads: fewer than snapshot_min_records, so the snapshot stays as it is.
    for image_id in _upload(store, seed=5, n=3):
        work.index_image(runtime, TENANT, COLLECTION, image_id)
    assert sweep(store, Sent(), leases, SETTINGS).snapshots == {}

    after = SearchEngine(store, None)
    store.record_reads = 0
    after.catch_up_all()
    assert store.record_reads == 3  # the snapshot's records are not read one by one
    old, new = _served(before)[0].index, _served(after)[0].index
    assert len(new) == 15 and set(old.ids()) < set(new.ids())
    # The same vectors, labels and (id) order as records read one by one give.
    fresh = SearchEngine(FilesystemStore(tmp_path / "store"), None)
    store.delete(LAYOUT.features_snapshot("v0001"))
    fresh.catch_up_all()
    reference = _served(fresh)[0].index
    assert new.ids() == reference.ids()
    np.testing.assert_array_equal(new._view.columns[:, :15], reference._view.columns[:, :15])
    np.testing.assert_array_equal(new._view.labels[:15], reference._view.labels[:15])


def test_a_corrupt_snapshot_is_ignored_and_the_records_read(store):
    from pecbir_platform.bus import InMemoryBus

    runtime = Runtime(SETTINGS, store, InMemoryBus())
    _upload(store, seed=6, n=12)
    _train(runtime, "v0001")
    _reindex(runtime, "v0001", work.reindex_plan(runtime, TENANT, COLLECTION, "v0001"))
    store.put(LAYOUT.features_snapshot("v0001"), b"not an npz")
    engine = SearchEngine(store, None)
    engine.catch_up_all()
    assert len(_served(engine)[0].index) == 12


def test_a_replica_whose_swap_lagged_serves_the_indexed_version_before_a_newer_one_fills(store):
    """The store records v0002 as indexed (uploads now skip v0001) while this replica, behind
    on the stream, still serves v0001; v0003 is trained. The replica serves v0002 from the
    store before v0003 starts filling, so an upload made now is searchable at once."""
    from pecbir_contracts.events import ModelEvent
    from pecbir_contracts.records import write_indexed_version
    from pecbir_platform.bus import InMemoryBus

    runtime = Runtime(SETTINGS, store, InMemoryBus())
    seeded = _upload(store, seed=8, n=12)
    _train(runtime, "v0001")
    _reindex(runtime, "v0001", work.reindex_plan(runtime, TENANT, COLLECTION, "v0001"))
    write_indexed_version(store, LAYOUT, "v0001")
    engine = SearchEngine(store, None)
    engine.catch_up_all()
    _train(runtime, "v0002", dim=1)
    engine.apply(ModelEvent(tenant=TENANT, collection=COLLECTION, version="v0002"))
    _reindex(runtime, "v0002", work.reindex_plan(runtime, TENANT, COLLECTION, "v0002"))
    write_indexed_version(store, LAYOUT, "v0002")  # its events not applied here: lagging
    assert [v.name for v in _served(engine) if v] == ["v0001", "v0002"]

    _train(runtime, "v0003")
    engine.apply(ModelEvent(tenant=TENANT, collection=COLLECTION, version="v0003"))
    serving, pending = _served(engine)
    assert (serving.name, pending.name) == ("v0002", "v0003")
    assert sorted(serving.index.ids()) == sorted(seeded)
    (upload,) = _upload(store, seed=9)
    start = runtime.bus.last_id()
    assert work.index_image(runtime, TENANT, COLLECTION, upload).versions == ("v0002", "v0003")
    for _, event in runtime.bus.read(start, block_ms=0):
        engine.apply(event)
    assert upload in _served(engine)[0].index


def test_a_reindex_chunk_gives_way_to_an_upload_and_skips_or_repeats_no_image(
    tmp_path, store, redis_url
):
    """A real Celery worker (solo pool, the uploads' and re-index queues, priority order) runs
    a re-index chunk of 12 images, slowed by the test hook; an upload's index task queued
    meanwhile runs before the chunk's last images (the rest of the chunk is queued again),
    and every image of the chunk is indexed and published exactly once."""
    from pecbir_contracts.events import VectorEvent
    from pecbir_contracts.tasks import QUEUE_INDEX, QUEUE_REINDEX, TASK_INDEX_IMAGE
    from pecbir_gateway.dispatch import CeleryDispatcher
    from pecbir_harness.procs import celery_worker
    from pecbir_platform.bus import RedisBus

    bus = RedisBus(redis_url)
    runtime = Runtime(SETTINGS, store, bus)
    seeded = _upload(store, seed=10, n=12)
    _train(runtime, "v0001")
    (chunk,) = work.reindex_plan(runtime, TENANT, COLLECTION, "v0001", size=12)
    assert sorted(chunk) == sorted(seeded)
    (upload,) = _upload(store, seed=11)
    delay = tmp_path / "chunk-delay"
    delay.write_text("0.4")
    env = {
        "PECBIR_BROKER_URL": redis_url,
        "PECBIR_STORE_URL": f"file://{store.root}",
        "PECBIR_RECONCILE_INTERVAL_S": "0",
        "PECBIR_TEST_CHUNK_DELAY_FILE": str(delay),
    }
    broker = CeleryDispatcher(redis_url)
    log = tmp_path / "worker.log"
    broker.send(TASK_INDEX_CHUNK, [TENANT, COLLECTION, "v0001", chunk])
    with celery_worker(env, log, (QUEUE_INDEX, QUEUE_REINDEX)):
        done = lambda: store.list(LAYOUT.features_prefix("v0001"))  # noqa: E731
        _until(lambda: len(done()) >= 2, "the chunk has started", timeout=120)
        broker.send(TASK_INDEX_IMAGE, [TENANT, COLLECTION, upload])
        _until(lambda: len(done()) == 13, "the chunk and the upload are indexed", timeout=120)
        delay.unlink()
        time.sleep(1.0)  # a chunk image done twice would publish again by now
    events = [e for _, e in bus.read("0-0", block_ms=10) if isinstance(e, VectorEvent)]
    order = [event.image_id for event in events]
    assert sorted(order) == sorted([*chunk, upload])  # each image once: none skipped or twice
    assert order.index(upload) < len(chunk)  # before the chunk's last image: it gave way
    assert "gives way to uploads" in log.read_text()


class FailingRuntime(Runtime):
    """The runtime, whose pipeline of one version cannot featurise some images (a fault
    injected only under that version: the older one indexes them)."""

    def __init__(self, *args, fail_version: str, fail_ids: set[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_version, self.fail_ids = fail_version, fail_ids
        self.attempts = 0

    def model(self, layout, version):
        pipeline = super().model(layout, version)
        if version != self.fail_version:
            return pipeline
        runtime, store = self, self.store

        class Failing:
            def __getattr__(self, name):
                return getattr(pipeline, name)

            def fisher_vectors(self, images, masks):
                for image_id in runtime.fail_ids:
                    stored = decode_image_png(store.get(LAYOUT.cipher(image_id)), "cipher")
                    if np.array_equal(stored, images[0]):
                        runtime.attempts += 1
                        raise ValueError("no patch of this image fits the model")
                return pipeline.fisher_vectors(images, masks)

        return Failing()


def test_an_image_failing_only_under_the_new_version_is_given_up_and_the_swap_proceeds(
    store, redis_url
):
    from prometheus_client import REGISTRY

    from pecbir_platform.bus import RedisBus

    metric = "pecbir_index_version_failures_total"
    failures_before = REGISTRY.get_sample_value(metric) or 0.0
    runtime = FailingRuntime(
        SETTINGS, store, RedisBus(redis_url), fail_version="v0002", fail_ids=set()
    )
    import redis

    leases = RedisLeases(redis.Redis.from_url(redis_url))
    seeded = _upload(store, seed=12, n=12)
    _train(runtime, "v0001")
    _reindex(runtime, "v0001", work.reindex_plan(runtime, TENANT, COLLECTION, "v0001"))
    assert sweep(store, Sent(), leases, SETTINGS).indexed_versions == ["v0001"]
    engine = SearchEngine(store, runtime.bus)
    engine.start()
    try:
        _until(lambda: len(_served(engine)[0].index) == 12, "v0001 serves the seeded images")
        bad = seeded[3]
        runtime.fail_ids.add(bad)
        _train(runtime, "v0002", dim=1)
        (chunk,) = work.reindex_plan(runtime, TENANT, COLLECTION, "v0002", size=12)
        attempts = SETTINGS.version_attempts
        assert attempts >= 2
        for attempt in range(1, attempts + 1):  # what index_chunk and its re-queues do
            for image_id in chunk:
                try:
                    work.index_image(runtime, TENANT, COLLECTION, image_id, "v0002")
                except work.PoisonMessage as exc:
                    assert image_id == bad
                    given_up = work.version_failed(
                        runtime, TENANT, COLLECTION, "v0002", bad, work.describe_error(exc)
                    )
                    assert given_up == (attempt == attempts)
            chunk = [bad]
            if attempt < attempts:  # the swap waits while attempts are left
                time.sleep(0.5)
                assert _served(engine)[0].name == "v0001"
        assert runtime.attempts == attempts

        def swapped() -> bool:
            serving, pending = _served(engine)
            return serving.name == "v0002" and pending is None

        _until(swapped, "the swap to v0002 without the failed image")
        held = sorted(_served(engine)[0].index.ids())
        assert held == sorted(set(seeded) - {bad})
        failure = json.loads(store.get(LAYOUT.version_failure("v0002", bad)))
        assert "no patch of this image fits" in failure["reason"]
        assert f"({attempts} attempts)" in failure["reason"]
        assert failure["version"] == "v0002"
        assert not store.exists(LAYOUT.failure(bad))  # not failed for every version
        assert REGISTRY.get_sample_value(metric) == failures_before + 1
        # The janitor: v0002 is indexed without it, and the image is not queued again.
        report = sweep(store, Sent(), leases, SETTINGS, now=time.time() + BOUND + 1)
        assert report.indexed_versions == ["v0002"] and report.requeued_images == []
        # A search service started now serves v0002 at once.
        restarted = SearchEngine(store, None)
        restarted.catch_up_all()
        assert _served(restarted)[0].name == "v0002" and _served(restarted)[1] is None
    finally:
        engine.stop()


def test_an_upload_failing_under_the_pending_version_is_searchable_under_the_serving_one(
    store, redis_url
):
    from pecbir_platform.bus import RedisBus

    runtime = FailingRuntime(
        SETTINGS, store, RedisBus(redis_url), fail_version="v0002", fail_ids=set()
    )
    seeded = _upload(store, seed=13, n=12)
    _train(runtime, "v0001")
    _reindex(runtime, "v0001", work.reindex_plan(runtime, TENANT, COLLECTION, "v0001"))
    import redis

    assert sweep(
        store, Sent(), RedisLeases(redis.Redis.from_url(redis_url)), SETTINGS
    ).indexed_versions == ["v0001"]
    engine = SearchEngine(store, runtime.bus)
    engine.start()
    try:
        _train(runtime, "v0002", dim=1)
        _reindex(runtime, "v0002", work.reindex_plan(runtime, TENANT, COLLECTION, "v0002")[:1])
        (upload,) = _upload(store, seed=14)
        runtime.fail_ids.add(upload)
        outcome = work.index_image(runtime, TENANT, COLLECTION, upload)
        assert outcome.versions == ("v0001",) and outcome.version == "v0001"
        assert [v for v, _ in outcome.failed] == ["v0002"]
        _until(lambda: upload in _served(engine)[0].index, "the upload is served by v0001")
        for _ in range(SETTINGS.version_attempts):  # index_image's task, then its re-queues
            given_up = work.version_failed(
                runtime, TENANT, COLLECTION, "v0002", upload, outcome.failed[0][1]
            )
        assert given_up
        _reindex(runtime, "v0002", work.reindex_plan(runtime, TENANT, COLLECTION, "v0002"))
        _until(lambda: _served(engine)[0].name == "v0002", "the swap to v0002")
        assert sorted(_served(engine)[0].index.ids()) == sorted(seeded)
    finally:
        engine.stop()
