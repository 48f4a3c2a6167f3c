"""Recovery after hard kills (issue 15): the reconciler and the janitor, free of Celery.

A worker killed mid-task (OOM, node loss, kill -9) leaves its message unacknowledged in Redis
until the visibility timeout, which must stay above the longest task (training) or that task
runs twice. So work does not wait for it:

- Every running task keeps a heartbeat in the Redis sorted set `IN_FLIGHT_KEY` (member: the
  task name and arguments; score: the last beat), renewed every quarter of
  `redelivery_bound_s` and removed when the task ends. A task whose beat is older than the
  bound lost its worker; `requeue_stale` queues it again. That costs one range query per
  pass, whatever the size of the store. Training is queued again too, but never runs twice at
  once: the task itself holds `train_lease` while it trains and skips a version whose lease
  someone holds (a late redelivery finds the manifest and only publishes again).
- Less often (`janitor_interval_s`), `sweep` lists the store: every complete image still
  lacking features of its collection's current model longer than `redelivery_bound_s` is
  queued again (what no heartbeat covers: an upload answered "stored, not queued"), so is a
  requested version nobody trains; and it removes crash debris older than `debris_grace_s`:
  objects of an image whose `meta.json` (the commit marker, written last) never came — a
  gateway killed mid-upload — and the filesystem store's temporary files of writes that never
  finished. A complete image, or an upload whose newest object is younger than the grace
  period, is never touched.

Indexing is idempotent (the feature record is written once, the search service upserts by
image id), so a task queued again while its original is late only finds the record and
publishes the same vector again. One worker of the cluster runs each pass (a Redis lease);
`Reconciler` runs the loop in a thread of each worker's main process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from pecbir_contracts.layout import TENANTS_PREFIX, CollectionLayout, version_number
from pecbir_contracts.records import read_current_version
from pecbir_contracts.store import ObjectStore
from pecbir_contracts.tasks import TASK_INDEX_IMAGE, TASK_TRAIN_MODEL
from pecbir_indexer.settings import IndexerSettings
from pecbir_platform.store import list_modified

__all__ = [
    "IN_FLIGHT_KEY",
    "JANITOR_LEASE",
    "RECONCILER_LEASE",
    "InFlight",
    "Reconciler",
    "RedisLeases",
    "SweepReport",
    "Watch",
    "requeue_stale",
    "sweep",
    "train_lease",
]

log = logging.getLogger(__name__)

RECONCILER_LEASE = "pecbir:lease:reconciler"
JANITOR_LEASE = "pecbir:lease:janitor"
IN_FLIGHT_KEY = "pecbir:in-flight"
_REQUEUED_PREFIX = "pecbir:requeued:"

REQUEUED = Counter(
    "pecbir_reconciler_requeued",
    "Tasks the reconciler queued again (work waiting longer than the redelivery bound)",
    ["task"],
)
REMOVED = Counter(
    "pecbir_janitor_removed",
    "Crash debris the janitor removed: objects of incomplete images, temporary files",
    ["kind"],
)
SWEEPS = Counter("pecbir_reconciler_sweeps", "Reconciler passes, by outcome", ["outcome"])

Send = Callable[[str, Sequence[object]], None]

_COLLECTION_KEY = re.compile(
    rf"^{TENANTS_PREFIX}(?P<tenant>[^/]+)/collections/(?P<collection>[^/]+)/"
)


def train_lease(tenant: str, collection: str, version: str) -> str:
    """The Redis key a running training of `version` holds (see module docstring)."""
    return f"pecbir:lease:train:{tenant}/{collection}/{version}"


class RedisLeases:
    """Short leases and once-per-period markers in Redis (SET NX EX)."""

    def __init__(self, client: Any) -> None:
        self.redis = client

    def claim(self, name: str, ttl_s: float) -> bool:
        """True if this call took `name` for `ttl_s` seconds (nobody held it)."""
        return bool(self.redis.set(name, b"1", nx=True, px=max(1, int(ttl_s * 1000))))

    def held(self, name: str) -> bool:
        """Whether someone holds `name` now."""
        return bool(self.redis.exists(name))


class InFlight:
    """Heartbeats of running tasks in a Redis sorted set (module docstring).

    Parameters
    ----------
    client
        A `redis.Redis` client.
    key
        The sorted set's key.
    """

    def __init__(self, client: Any, key: str = IN_FLIGHT_KEY) -> None:
        self.redis = client
        self.key = key

    @staticmethod
    def member(task_name: str, args: Sequence[object]) -> str:
        """The set member of a task: its name and arguments, as JSON."""
        return json.dumps([task_name, list(args)], separators=(",", ":"))

    def beat(self, task_name: str, args: Sequence[object], now: float | None = None) -> None:
        """Record that the task runs now."""
        now = time.time() if now is None else now
        self.redis.zadd(self.key, {self.member(task_name, args): now})

    def done(self, task_name: str, args: Sequence[object]) -> None:
        """The task ended (done, failed for good, or handed back): no heartbeat to watch."""
        member = self.member(task_name, args)
        self.redis.pipeline().zrem(self.key, member).delete(self.requeue_counter(member)).execute()

    @staticmethod
    def requeue_counter(member: str) -> str:
        """The key counting how often the task `member` was queued again (lost its worker)."""
        return f"{_REQUEUED_PREFIX}count:{member}"

    def stale(self, older_than_s: float, now: float | None = None) -> list[tuple[str, list]]:
        """Tasks whose last beat is older than `older_than_s` seconds."""
        now = time.time() if now is None else now
        found = self.redis.zrangebyscore(self.key, "-inf", now - older_than_s)
        return [tuple(json.loads(member)) for member in found]  # type: ignore[misc]

    @contextlib.contextmanager
    def running(self, task_name: str, args: Sequence[object], every_s: float) -> Iterator[Watch]:
        """Beat every `every_s` seconds while the block runs, then mark the task done unless
        the block set `keep` on the yielded `Watch` (a retry is scheduled: the entry stays
        and goes stale, so the task is queued again, unless the retry runs and beats)."""
        stop = threading.Event()
        watch = Watch()

        def keep_beating() -> None:
            while not stop.wait(every_s):
                try:
                    self.beat(task_name, args)
                except Exception as exc:  # Redis down a moment: the next beat tries again
                    log.debug("heartbeat of %s failed: %s", task_name, exc)

        self.beat(task_name, args)
        beater = threading.Thread(target=keep_beating, name="pecbir-heartbeat", daemon=True)
        beater.start()
        try:
            yield watch
        finally:
            stop.set()
            beater.join(5)
            if not watch.keep:
                with contextlib.suppress(Exception):  # Redis down: it goes stale, harmless
                    self.done(task_name, args)


@dataclass
class Watch:
    """A running task's heartbeat; `keep` = leave its entry when the task returns."""

    keep: bool = False


def requeue_stale(
    in_flight: InFlight,
    send: Send,
    older_than_s: float,
    now: float | None = None,
    *,
    max_requeues: int = 8,
    give_up: Callable[[str, list, str], None] | None = None,
) -> list[tuple[str, list]]:
    """Queue again every task whose heartbeat is older than `older_than_s` seconds.

    Parameters
    ----------
    in_flight
        The heartbeats.
    send
        Queues a task: ``send(task_name, args)``.
    older_than_s
        How old a last beat means "its worker is gone" (`redelivery_bound_s`).
    now
        The time to judge against (epoch seconds); the clock when None.
    max_requeues
        A task that lost its worker more often than this (one that kills every worker it
        runs on: out of memory) is not queued again but handed to `give_up`.
    give_up
        ``give_up(task_name, args, reason)``: dead-letter it (None: only log).

    Returns
    -------
    list of (str, list)
        The tasks queued again (each gets a fresh beat: queued once per bound at most).
    """
    now = time.time() if now is None else now
    requeued = []
    for task_name, args in in_flight.stale(older_than_s, now):
        member = in_flight.member(task_name, args)
        counter = in_flight.requeue_counter(member)
        count, _ = in_flight.redis.pipeline().incr(counter).expire(counter, 7 * 86400).execute()
        if int(count) > max_requeues:
            in_flight.done(task_name, args)
            reason = f"lost its worker {int(count)} times (killed each time?)"
            log.error("reconciler: %s %s %s: dead-lettered", task_name, member[:200], reason)
            if give_up is not None:
                give_up(task_name, args, reason)
            continue
        send(task_name, args)
        in_flight.beat(task_name, args, now)  # the copy now has a bound's time to start
        REQUEUED.labels(task_name).inc()
        requeued.append((task_name, args))
        log.warning(
            "reconciler: %s %s lost its heartbeat (> %.0f s): queued again",
            task_name,
            json.dumps(args)[:200],
            older_than_s,
        )
    return requeued


@dataclass
class SweepReport:
    """What one pass found and did."""

    requeued_images: list[str] = field(default_factory=list)
    requeued_trains: list[str] = field(default_factory=list)
    waiting_images: int = 0
    removed_image_objects: list[str] = field(default_factory=list)
    removed_temp_files: list[str] = field(default_factory=list)


def sweep(
    store: ObjectStore,
    send: Send,
    leases: RedisLeases,
    settings: IndexerSettings,
    now: float | None = None,
) -> SweepReport:
    """One reconciler and janitor pass over every collection of the store.

    Parameters
    ----------
    store
        The object store (a back end that lists modification times).
    send
        Queues a task: ``send(task_name, args)``.
    leases
        Where training leases and the per-image re-queue markers live.
    settings
        The bounds: `redelivery_bound_s`, `debris_grace_s`, `reconcile_max_requeue`.
    now
        The time to judge ages against (epoch seconds); the clock when None.

    Returns
    -------
    SweepReport
        What was queued again and what was removed.
    """
    now = time.time() if now is None else now
    report = SweepReport()
    grouped: dict[tuple[str, str], dict[str, float]] = {}
    for key, modified in list_modified(store, TENANTS_PREFIX).items():
        match = _COLLECTION_KEY.match(key)
        if match:
            grouped.setdefault((match["tenant"], match["collection"]), {})[key] = modified
    for (tenant, collection), objects in sorted(grouped.items()):
        try:
            layout = CollectionLayout(tenant, collection)
        except ValueError:
            continue  # not written by the gateway: leave it alone
        _collect_debris(store, layout, objects, now - settings.debris_grace_s, report)
        _requeue_index(store, send, leases, settings, layout, objects, now, report)
        _requeue_training(send, leases, settings, layout, objects, now, report)
    stale_temp_files = getattr(store, "stale_temp_files", None)
    if stale_temp_files is not None:
        for path in stale_temp_files(settings.debris_grace_s):
            path.unlink(missing_ok=True)
            log.warning("janitor: removed temporary file %s of an unfinished write", path)
            REMOVED.labels("temp_file").inc()
            report.removed_temp_files.append(str(path))
    return report


def _images(layout: CollectionLayout, objects: dict[str, float]) -> dict[str, dict[str, float]]:
    """Image id → its objects (key → modified) under images/."""
    images: dict[str, dict[str, float]] = {}
    prefix = layout.images_prefix
    for key, modified in objects.items():
        if key.startswith(prefix):
            image_id = key[len(prefix) :].split("/", 1)[0]
            images.setdefault(image_id, {})[key] = modified
    return images


def _collect_debris(
    store: ObjectStore,
    layout: CollectionLayout,
    objects: dict[str, float],
    cutoff: float,
    report: SweepReport,
) -> None:
    for image_id, parts in _images(layout, objects).items():
        meta = f"{layout.images_prefix}{image_id}/meta.json"
        if meta in parts or max(parts.values()) >= cutoff:
            continue  # complete, or an upload that may still be in flight
        if store.exists(meta):
            continue  # completed since the listing
        for key in sorted(parts):
            store.delete(key)
            REMOVED.labels("image_object").inc()
            report.removed_image_objects.append(key)
        log.warning(
            "janitor: removed incomplete image %s of %s (%d objects, no meta.json)",
            image_id,
            layout.root,
            len(parts),
        )


def _is_retired_key(layout: CollectionLayout, image_id: str, objects: dict[str, float]) -> bool:
    try:
        return layout.retired(image_id) in objects
    except ValueError:
        return False  # not an image id the gateway writes


def _requeue_index(
    store: ObjectStore,
    send: Send,
    leases: RedisLeases,
    settings: IndexerSettings,
    layout: CollectionLayout,
    objects: dict[str, float],
    now: float,
    report: SweepReport,
) -> None:
    if layout.current_model not in objects:
        return  # no model yet: uploads wait for the first training, nothing is lost
    version = read_current_version(store, layout)
    if version is None:
        return
    indexed = {layout.image_id_of_features(version, key) for key in objects}
    bound = settings.redelivery_bound_s
    for image_id, parts in sorted(_images(layout, objects).items()):
        meta = f"{layout.images_prefix}{image_id}/meta.json"
        if meta not in parts or image_id in indexed or layout.failure(image_id) in objects:
            continue
        if _is_retired_key(layout, image_id, objects):
            continue  # the owner retired it: it is not indexed on purpose
        report.waiting_images += 1
        # Waiting since it was stored, or since its model became current (a re-index).
        since = max(parts[meta], objects[layout.current_model])
        if now - since <= bound:
            continue
        if len(report.requeued_images) >= settings.reconcile_max_requeue:
            continue
        # At most once per bound per image: a backlog is not queued again and again.
        marker = f"{_REQUEUED_PREFIX}{layout.tenant}/{layout.collection}/{image_id}"
        if not leases.claim(marker, bound):
            continue
        send(TASK_INDEX_IMAGE, [layout.tenant, layout.collection, image_id])
        REQUEUED.labels(TASK_INDEX_IMAGE).inc()
        report.requeued_images.append(image_id)
        log.warning(
            "reconciler: image %s of %s waited %.0f s (> %.0f s) for its index; queued again",
            image_id,
            layout.root,
            now - since,
            bound,
        )


def _requeue_training(
    send: Send,
    leases: RedisLeases,
    settings: IndexerSettings,
    layout: CollectionLayout,
    objects: dict[str, float],
    now: float,
    report: SweepReport,
) -> None:
    current = None
    for key in objects:
        version = layout.version_of_model_key(key)  # models/<v>/request.json
        if version and layout.manifest(version) in objects:
            number = version_number(version)
            current = number if current is None else max(current, number)
    for key, requested in sorted(objects.items()):
        version = layout.version_of_model_key(key)
        if version is None or layout.manifest(version) in objects:
            continue
        if layout.model_failure(version) in objects:
            continue
        if current is not None and version_number(version) < current:
            continue  # superseded: training it could not change what is served
        if now - requested <= settings.redelivery_bound_s:
            continue
        if leases.held(train_lease(layout.tenant, layout.collection, version)):
            continue  # running (its lease is renewed): never a second one at once
        marker = f"{_REQUEUED_PREFIX}train/{layout.tenant}/{layout.collection}/{version}"
        if not leases.claim(marker, max(settings.redelivery_bound_s, settings.train_lease_s)):
            continue
        send(TASK_TRAIN_MODEL, [layout.tenant, layout.collection, version])
        REQUEUED.labels(TASK_TRAIN_MODEL).inc()
        report.requeued_trains.append(version)
        log.warning(
            "reconciler: training %s of %s requested %.0f s ago, not running; queued again",
            version,
            layout.root,
            now - requested,
        )


class Reconciler:
    """The recovery loop, in a daemon thread: each interval one worker of the cluster queues
    stale tasks again; each janitor interval one of them also sweeps the store.

    Parameters
    ----------
    settings
        `reconcile_interval_s`, `janitor_interval_s` and the bounds of `sweep`.
    store
        The object store.
    send
        Queues a task by name.
    leases
        Redis leases (also elect the worker that runs a pass).
    in_flight
        The running tasks' heartbeats.
    give_up
        Dead-letters a task that lost its worker too often (see `requeue_stale`).
    """

    def __init__(
        self,
        settings: IndexerSettings,
        store: ObjectStore,
        send: Send,
        leases: RedisLeases,
        in_flight: InFlight,
        give_up: Callable[[str, list, str], None] | None = None,
    ) -> None:
        self.give_up = give_up
        self.settings = settings
        self.store = store
        self.send = send
        self.leases = leases
        self.in_flight = in_flight
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> SweepReport | None:
        """One pass if no other worker ran this interval's; the sweep's report when this
        pass also swept the store, else None."""
        settings = self.settings
        if not self.leases.claim(RECONCILER_LEASE, settings.reconcile_interval_s * 0.9):
            return None
        requeue_stale(
            self.in_flight,
            self.send,
            settings.redelivery_bound_s,
            max_requeues=settings.max_deliveries,
            give_up=self.give_up,
        )
        if not self.leases.claim(JANITOR_LEASE, settings.janitor_interval_s * 0.9):
            return None
        return sweep(self.store, self.send, self.leases, settings)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval_s):
            try:
                self.run_once()
            except Exception as exc:  # Redis or the store down: the next pass tries again
                SWEEPS.labels("error").inc()
                log.warning("reconciler pass failed: %s", exc)
                continue
            SWEEPS.labels("done").inc()

    def start(self) -> None:
        """Start the loop (a daemon thread; `stop` ends it)."""
        self._thread = threading.Thread(target=self._loop, name="pecbir-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop after the current pass."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
