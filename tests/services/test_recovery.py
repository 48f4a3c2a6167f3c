"""Recovery after hard kills (issue 15), without processes: a duplicate delivery is harmless,
the reconciler re-queues index work waiting longer than the bound (and training only without
its lease), the janitor removes crash debris after the grace period and nothing else.

Real Redis (a private redis-server) for the leases; the filesystem store.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from pecbir_contracts.events import VectorEvent
from pecbir_contracts.layout import idempotency_record_key
from pecbir_contracts.records import FeatureRecord
from pecbir_contracts.tasks import TASK_INDEX_IMAGE, TASK_TRAIN_MODEL
from pecbir_indexer import work
from pecbir_indexer.recovery import (
    InFlight,
    RedisLeases,
    ScanCursor,
    requeue_stale,
    sweep,
    to_front,
    train_lease,
)
from pecbir_indexer.settings import IndexerSettings
from pecbir_platform.bus import InMemoryBus
from pecbir_search.engine import SearchEngine
from tests.services.helpers import labelled_set
from tests.services.test_indexer_search import LAYOUT, SMALL, _put_image
from tests.services.test_indexer_search import runtime as runtime
from tests.services.test_indexer_search import trained as trained

BOUND = 60.0
SETTINGS = IndexerSettings(redelivery_bound_s=BOUND, debris_grace_s=600.0, train_lease_s=30.0)


@pytest.fixture
def leases(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary: the reconciler's leases cannot be tested")
    import redis

    from pecbir_harness.procs import RedisProcess

    server = RedisProcess(tmp_path / "redis").start()
    try:
        yield RedisLeases(redis.Redis.from_url(server.url))
    finally:
        server.stop()


class Sent(list):
    def __call__(self, task_name: str, args) -> None:
        self.append((task_name, tuple(args)))


def _age(store, key: str, seconds: float) -> None:
    path = store.root / key
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_a_duplicate_delivery_is_harmless(runtime, trained):
    ids, _ = trained
    # Two deliveries of one image's task at once (a redelivery racing the reconciler's copy).
    threads = [
        threading.Thread(target=work.index_image, args=(runtime, "hosp-a", "brain", ids[0]))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    again = work.index_image(runtime, "hosp-a", "brain", ids[0])
    assert again.state == "already_indexed"
    keys = runtime.store.list(LAYOUT.features_prefix("v0001"))
    assert keys == [LAYOUT.features("v0001", ids[0])]
    record = FeatureRecord.from_bytes(runtime.store.get(keys[0]))
    # The search service applies every event the three deliveries published: one vector.
    engine = SearchEngine(runtime.store, None)
    events = runtime.bus.read("0-0", block_ms=0)
    assert sum(isinstance(event, VectorEvent) for _, event in events) == 3
    for _, event in events:
        engine.apply(event)
    state = engine.collection("hosp-a", "brain")
    assert len(state.serving.index) == 1
    found, _, _ = state.serving.index.search(record.vector, k=5)
    assert list(found) == [ids[0]]


def test_index_work_waiting_longer_than_the_bound_is_queued_again_once(
    runtime,
    trained,
    leases,
):
    ids, _ = trained
    store = runtime.store
    work.index_image(runtime, "hosp-a", "brain", ids[0])  # indexed: never queued again
    store.put(LAYOUT.failure(ids[1]), b'{"reason": "poison"}')  # dead-lettered: neither
    store.put(LAYOUT.retired(ids[2]), b'{"reason": "replaced"}')  # retired by its owner: neither
    assert work.index_image(runtime, "hosp-a", "brain", ids[2]).state == "retired"
    sent = Sent()
    early = sweep(store, sent, leases, SETTINGS)
    assert sent == [] and early.waiting_images == len(ids) - 3
    late = sweep(store, sent, leases, SETTINGS, now=time.time() + BOUND + 1)
    assert sorted(late.requeued_images) == sorted(ids[3:])
    assert sorted(sent) == sorted((TASK_INDEX_IMAGE, ("hosp-a", "brain", i)) for i in ids[3:])
    # Within the bound after that, nothing again: a backlog is not queued over and over.
    sent.clear()
    sweep(store, sent, leases, SETTINGS, now=time.time() + BOUND + 2)
    assert sent == []
    text = _metrics()
    assert 'pecbir_reconciler_requeued_total{task="pecbir.index.image"}' in text


def test_the_janitor_pages_through_a_collection_and_resumes_where_it_stopped(
    runtime, trained, leases
):
    """`janitor_page_objects`: a pass lists a window of image objects after the previous
    pass's (its cursor in Redis), and the feature records of the same images only; it queues
    again what its window lacks, and marks a version indexed only at the end of a cycle in
    which no window lacked it."""
    ids, _ = trained
    store, order = runtime.store, sorted(ids)
    lost = order[7]  # in the third window
    for image_id in order:
        if image_id != lost:
            work.index_image(runtime, "hosp-a", "brain", image_id)
    # Three objects per image: 7 objects and the rest of the last image's make 3 images.
    settings = SETTINGS.model_copy(update={"janitor_page_objects": 7})
    later = time.time() + BOUND + 1
    expected = [(None, order[2]), (order[2], order[5]), (order[5], order[8]), (order[8], None)]

    def cycle() -> list:
        reports = [sweep(store, Sent(), leases, settings, now=later) for _ in expected]
        assert [r.windows[LAYOUT.root] for r in reports] == expected
        assert [r.listed_image_objects for r in reports] == [9, 9, 9, 9]
        return reports

    first = cycle()
    assert [r.requeued_images for r in first] == [[], [], [lost], []]
    assert [r.indexed_versions for r in first] == [[], [], [], []]  # it lacked one
    assert ScanCursor.load(leases.redis, LAYOUT).after is None  # the next pass starts over
    work.index_image(runtime, "hosp-a", "brain", lost)  # the task queued again
    second = cycle()
    assert [r.indexed_versions for r in second] == [[], [], [], ["v0001"]]
    assert all(r.requeued_images == [] for r in second)
    # The whole collection in one pass (the default page holds it): the same verdicts.
    assert sweep(store, Sent(), leases, SETTINGS).windows[LAYOUT.root] == (None, None)


def test_an_overdue_image_whose_task_is_queued_or_running_is_not_queued_again(
    runtime, trained, leases
):
    """A backlog is late, not lost: queueing its tasks again only lengthens the queue."""
    from pecbir_gateway.dispatch import CeleryDispatcher

    ids, _ = trained
    kwargs = leases.redis.connection_pool.connection_kwargs
    broker = CeleryDispatcher(f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}")
    broker.send(TASK_INDEX_IMAGE, ["hosp-a", "brain", ids[0]])  # waits in the index queue
    InFlight(leases.redis).beat(TASK_INDEX_IMAGE, ["hosp-a", "brain", ids[1]])  # runs
    sent = Sent()
    late = sweep(runtime.store, sent, leases, SETTINGS, now=time.time() + BOUND + 1)
    assert sorted(late.requeued_images) == sorted(ids[2:])
    assert late.queued_behind == 2


def test_an_index_task_queued_again_is_next_in_line(leases):
    """kombu pushes at the head of a queue's list and workers pop from its tail; `to_front`
    moves a re-queued task (it waited a bound already) to the tail, ahead of the uploads."""
    import json

    from celery import Celery

    from pecbir_contracts.tasks import QUEUE_INDEX

    kwargs = leases.redis.connection_pool.connection_kwargs
    app = Celery("test", broker=f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}")

    def send(n: int) -> str:
        args = ["hosp-a", "brain", f"{n:032x}"]
        return app.send_task(TASK_INDEX_IMAGE, args=args, queue=QUEUE_INDEX).id

    uploads = [send(n) for n in range(5)]
    again = send(99)
    assert to_front(leases.redis, QUEUE_INDEX, again)
    taken = [json.loads(leases.redis.rpop(QUEUE_INDEX))["headers"]["id"] for _ in range(6)]
    assert taken == [again, *uploads]  # the order a worker's BRPOP takes them
    assert not to_front(leases.redis, QUEUE_INDEX, again)  # taken already: nothing moved


def test_a_task_whose_heartbeat_stopped_is_queued_again_once_per_bound(leases):
    in_flight = InFlight(leases.redis)
    now = time.time()
    killed = (TASK_INDEX_IMAGE, ["hosp-a", "brain", "0" * 32])
    alive = (TASK_INDEX_IMAGE, ["hosp-a", "brain", "1" * 32])
    in_flight.beat(*killed, now=now - BOUND - 1)  # its worker was killed a bound ago
    in_flight.beat(*alive, now=now - 1)
    sent = Sent()
    assert requeue_stale(in_flight, sent, BOUND, now) == [killed]
    assert sent == [(killed[0], tuple(killed[1]))]
    sent.clear()
    assert requeue_stale(in_flight, sent, BOUND, now + 1) == []  # the copy has a bound to start
    # A task that ends is no longer watched; one whose retry is scheduled stays watched.
    with in_flight.running(*alive, every_s=0.05):
        time.sleep(0.2)
    kept = (TASK_TRAIN_MODEL, ["hosp-a", "brain", "v0002"])
    with in_flight.running(*kept, every_s=0.05) as watch:
        watch.keep = True
    assert in_flight.stale(-1.0) == [killed, kept]  # every member, oldest first
    text = _metrics()
    assert 'pecbir_reconciler_requeued_total{task="pecbir.index.image"}' in text
    # A task that kills every worker it runs on is dead-lettered, not queued for ever.
    given_up = []
    for _ in range(2):  # queued again once before: twice more is one too many
        in_flight.beat(*killed, now=now - BOUND - 1)
        requeue_stale(
            in_flight, sent, BOUND, now, max_requeues=2, give_up=lambda *a: given_up.append(a)
        )
    assert len(given_up) == 1 and given_up[0][:2] == killed
    assert killed not in in_flight.stale(-1.0)


def test_training_is_queued_again_only_when_nobody_holds_its_lease(
    runtime,
    trained,
    leases,
):
    store = runtime.store
    store.put(LAYOUT.train_request("v0002"), SMALL.model_dump_json().encode())
    sent = Sent()
    later = time.time() + BOUND + 1
    # Running elsewhere (its lease renewed): not a second time.
    assert leases.claim(train_lease("hosp-a", "brain", "v0002"), 5)
    sweep(store, sent, leases, SETTINGS, now=later)
    assert [task for task, _ in sent if task == TASK_TRAIN_MODEL] == []
    leases.redis.delete(train_lease("hosp-a", "brain", "v0002"))  # its worker was killed
    sweep(store, sent, leases, SETTINGS, now=later)
    assert (TASK_TRAIN_MODEL, ("hosp-a", "brain", "v0002")) in sent
    # v0001 is trained (manifest written): never queued again.
    assert (TASK_TRAIN_MODEL, ("hosp-a", "brain", "v0001")) not in sent


def test_the_janitor_removes_debris_after_the_grace_period_and_nothing_else(store, leases):
    images, masks, labels = labelled_set(2)
    complete = _put_image(store, (images[0] // 16).astype(np.uint8), masks[0], labels[0])
    crashed = _put_image(store, (images[1] // 16).astype(np.uint8), masks[1], labels[1])
    in_flight = _put_image(store, (images[1] // 16).astype(np.uint8), masks[1], labels[1])
    for image_id in (crashed, in_flight):
        store.delete(LAYOUT.meta(image_id))  # killed before its commit marker
    for key in store.list(LAYOUT.images_prefix):
        if crashed in key or complete in key:
            _age(store, key, 3600)
    record = idempotency_record_key("hosp-a", "key-00000001")
    store.put(record, b"{}")
    old_tmp = store.root / LAYOUT.image_prefix(crashed) / ".tmp-old"
    new_tmp = store.root / record.rsplit("/", 1)[0] / ".tmp-new"
    for tmp in (old_tmp, new_tmp):
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"partial")
    _age(store, old_tmp.relative_to(store.root).as_posix(), 3600)
    report = sweep(store, Sent(), leases, SETTINGS)
    assert sorted(report.removed_image_objects) == [LAYOUT.cipher(crashed), LAYOUT.mask(crashed)]
    assert report.removed_temp_files == [str(old_tmp)]
    assert not old_tmp.exists() and new_tmp.exists()
    remaining = {key.split("/")[-2] for key in store.list(LAYOUT.images_prefix)}
    assert remaining == {complete, in_flight}
    assert store.exists(record)
    text = _metrics()
    assert 'pecbir_janitor_removed_total{kind="image_object"}' in text
    assert 'pecbir_janitor_removed_total{kind="temp_file"}' in text


def _metrics() -> str:
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY).decode()


class _BusDownAtStart(InMemoryBus):
    """The Redis stream while Redis is down: unreachable until `back` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.back = threading.Event()

    def last_id(self) -> str:
        if not self.back.is_set():
            raise ConnectionError("Redis is down (simulated)")
        return super().last_id()

    def read(self, after: str, block_ms: int = 1000, count: int = 1000):
        if not self.back.is_set():
            raise ConnectionError("Redis is down (simulated)")
        return super().read(after, block_ms, count)


def test_search_starting_while_redis_is_down_serves_the_store_and_follows_once_it_is_back(
    runtime,
    trained,
):
    ids, _ = trained
    work.index_image(runtime, "hosp-a", "brain", ids[0])
    bus = _BusDownAtStart()
    engine = SearchEngine(runtime.store, bus)
    engine.start()  # before the fix: ConnectionError from last_id, the service did not start
    try:
        state = engine.collection("hosp-a", "brain")
        assert len(state.serving.index) == 1  # what the store held
        # An event published around the outage (its record already in the store, or not).
        runtime.bus = bus
        bus.back.set()
        work.index_image(runtime, "hosp-a", "brain", ids[1])
        deadline = time.monotonic() + 30
        while len(state.serving.index) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(state.serving.index) == 2
    finally:
        engine.stop()


def test_a_running_training_keeps_its_lease_beyond_the_lease_time(leases, monkeypatch):
    """The lease is renewed from a thread of its own while the task trains: held past
    `train_lease_s`, so the reconciler never starts the same training a second time; a
    second taker is refused meanwhile; released at the end."""
    from pecbir_indexer import tasks

    monkeypatch.setattr(tasks, "_lease_redis", lambda: leases.redis)
    monkeypatch.setattr(tasks.settings, "train_lease_s", 0.6)
    key = train_lease("hosp-a", "brain", "v0002")
    with tasks._training_lease("hosp-a", "brain", "v0002", eager=False) as mine:
        assert mine
        time.sleep(2.0)  # over three lease times: only renewals keep it
        assert leases.held(key)
        with tasks._training_lease("hosp-a", "brain", "v0002", eager=False) as second:
            assert not second
    assert not leases.held(key)
