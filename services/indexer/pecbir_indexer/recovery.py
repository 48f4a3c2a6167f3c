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
- Less often (`janitor_interval_s`), `sweep` lists the store — each collection in windows
  of `janitor_page_objects` image objects, resuming after the last pass's window
  (`ScanCursor`, in Redis), so that a pass stays bounded at 10⁷ objects: every complete image still
  lacking features of its collection's current (or served) model longer than
  `redelivery_bound_s`, and whose task is neither queued nor running (`waiting_tasks`), is
  queued again (what no heartbeat covers: a message Redis lost), so is a requested version
  nobody trains; and it removes crash debris older than `debris_grace_s`:
  objects of an image whose `meta.json` (the commit marker, written last) never came — a
  gateway killed mid-upload — and the filesystem store's temporary files of writes that never
  finished. A complete image, or an upload whose newest object is younger than the grace
  period, is never touched.
- The same pass records a version whose features cover every complete image as *indexed*
  (`records.live_versions`: uploads stop being indexed with older versions too) and writes
  a snapshot of the served versions' records (`records.FeatureSnapshot`) once enough
  records are not in it, so that a search service starts with one read per version.

Indexing is idempotent (the feature record is written once, the search service upserts by
image id), so a task queued again while its original is late only finds the record and
publishes the same vector again. One worker of the cluster runs each pass (a Redis lease);
`Reconciler` runs the loop in a thread of each worker's main process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import Counter

from pecbir_contracts.layout import TENANTS_PREFIX, CollectionLayout, version_number
from pecbir_contracts.records import (
    FeatureRecord,
    FeatureSnapshot,
    read_current_version,
    read_indexed_version,
    write_indexed_version,
)
from pecbir_contracts.store import ObjectNotFound, ObjectStore
from pecbir_contracts.tasks import (
    QUEUE_INDEX,
    QUEUE_REINDEX,
    QUEUE_REINDEX_GPU,
    TASK_INDEX_BATCH,
    TASK_INDEX_CHUNK,
    TASK_INDEX_IMAGE,
    TASK_REINDEX_COLLECTION,
    TASK_TRAIN_MODEL,
)
from pecbir_indexer.settings import IndexerSettings
from pecbir_platform.store import iter_modified, list_children, list_modified

__all__ = [
    "IN_FLIGHT_KEY",
    "JANITOR_LEASE",
    "RECONCILER_LEASE",
    "InFlight",
    "Reconciler",
    "RedisLeases",
    "ScanCursor",
    "SweepReport",
    "Watch",
    "requeue_stale",
    "sweep",
    "to_front",
    "train_lease",
    "waiting_tasks",
]

log = logging.getLogger(__name__)

RECONCILER_LEASE = "pecbir:lease:reconciler"
JANITOR_LEASE = "pecbir:lease:janitor"
IN_FLIGHT_KEY = "pecbir:in-flight"
_REQUEUED_PREFIX = "pecbir:requeued:"
_CURSOR_PREFIX = "pecbir:janitor:cursor:"

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


# Moves the message of a task id (ARGV[1]) among the first ARGV[2] of a kombu Redis list
# (KEYS[1]) to the list's tail; atomic (one script), so no other message is moved.
_TO_FRONT = """
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for _, item in ipairs(items) do
  if string.find(item, ARGV[1], 1, true) then
    redis.call('LREM', KEYS[1], 1, item)
    redis.call('RPUSH', KEYS[1], item)
    return 1
  end
end
return 0
"""


def to_front(client: Any, queue: str, task_id: str, scan: int = 1000) -> bool:
    """Put the message of `task_id`, just queued on `queue`, first in line.

    kombu's Redis transport pushes a message at the head of the queue's list and workers pop
    from the tail: a task queued again after it lost its worker waited behind every upload
    queued since, having waited a redelivery bound already (issue 15: in a loop of
    `pecbir recovery`, the uploads in flight at its first worker kills were its four slowest,
    112–118 s from ack to searchable against ≤ 95 s for the rest). Moved to the tail, it
    runs next. Priorities cannot do this: every
    message has the highest (0) by default. True if moved; False if a worker took it first.
    """
    return bool(client.eval(_TO_FRONT, 1, queue, task_id, scan))


def waiting_tasks(
    client: Any, queues: Sequence[str] = (QUEUE_INDEX, QUEUE_REINDEX, QUEUE_REINDEX_GPU)
) -> set[str]:
    """Index work queued in Redis (not yet delivered) or running with a heartbeat, as
    `InFlight.member` strings: what the sweep must not queue a second time.

    A backlog is not a loss: an image whose task waits behind others longer than the bound
    is in a queue, and one whose task runs beats; queueing those again would only lengthen
    the queue. A re-index chunk or batch counts as an index task for each of its images; a
    re-index fan-out as itself. Reads each queue (kombu's Redis list of JSON messages;
    Celery protocol 2: a base64 JSON body of ``[args, kwargs, embed]``) and the heartbeats.
    """
    tasks: list[tuple[str, list]] = []
    for member in client.zrange(IN_FLIGHT_KEY, 0, -1):
        with contextlib.suppress(ValueError, TypeError):
            task, args = json.loads(member)
            tasks.append((task, args))
    for queue in queues:
        for raw in client.lrange(queue, 0, -1):
            try:
                message = json.loads(raw)
                task = message["headers"]["task"]
                body = message["body"]
                if message.get("properties", {}).get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                tasks.append((task, json.loads(body)[0]))
            except (ValueError, KeyError, IndexError, TypeError):
                continue  # not a Celery message: nothing of ours
    members = set()
    for task, args in tasks:
        if task in (TASK_INDEX_CHUNK, TASK_INDEX_BATCH) and len(args) == 4:
            tenant, collection, _, image_ids = args
            members.update(
                InFlight.member(TASK_INDEX_IMAGE, [tenant, collection, image_id])
                for image_id in image_ids
            )
        else:
            members.add(InFlight.member(task, args))
    return members


@dataclass
class SweepReport:
    """What one pass found and did."""

    requeued_images: list[str] = field(default_factory=list)
    requeued_trains: list[str] = field(default_factory=list)
    waiting_images: int = 0
    # Overdue images whose index task is still queued (a backlog) or running: not queued again.
    queued_behind: int = 0
    indexed_versions: list[str] = field(default_factory=list)
    snapshots: dict[str, int] = field(default_factory=dict)
    removed_image_objects: list[str] = field(default_factory=list)
    removed_temp_files: list[str] = field(default_factory=list)
    # Collection root → (the image id its window started after, its last image id; None: the
    # start / the end of the collection), and how many image objects the windows held.
    windows: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    listed_image_objects: int = 0


def sweep(
    store: ObjectStore,
    send: Send,
    leases: RedisLeases,
    settings: IndexerSettings,
    now: float | None = None,
    snapshots: dict[str, FeatureSnapshot] | None = None,
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
    snapshots
        The feature snapshots of this store read or written by earlier passes (key →
        snapshot), kept by the caller so that a pass does not read them again (a record
        never changes, so a kept snapshot stays right; another writer's newer one only means
        more to read); None: read them.

    Returns
    -------
    SweepReport
        What was queued again and what was removed.
    """
    now = time.time() if now is None else now
    report = SweepReport()
    for layout in _collections(store):
        cursor = ScanCursor.load(leases.redis, layout)
        objects, end = _window(store, layout, cursor.after, settings.janitor_page_objects)
        report.windows[layout.root] = (cursor.after, end)
        report.listed_image_objects += sum(k.startswith(layout.images_prefix) for k in objects)
        _collect_debris(store, layout, objects, now - settings.debris_grace_s, report)
        _mark_indexed(store, layout, objects, report, cursor, cycle_ends=end is None)
        cursor.after = end
        cursor.save(leases.redis, layout)
        _requeue_index(store, send, leases, settings, layout, objects, now, report)
        _requeue_training(send, leases, settings, layout, objects, now, report)
        try:
            _write_snapshots(store, settings, layout, objects, report, snapshots)
        except Exception as exc:  # only start-up speed depends on it: the pass goes on
            log.warning("janitor: no snapshot of %s this pass: %s", layout.root, exc)
    stale_temp_files = getattr(store, "stale_temp_files", None)
    if stale_temp_files is not None:
        for path in stale_temp_files(settings.debris_grace_s):
            path.unlink(missing_ok=True)
            log.warning("janitor: removed temporary file %s of an unfinished write", path)
            REMOVED.labels("temp_file").inc()
            report.removed_temp_files.append(str(path))
    return report


def _collections(store: ObjectStore) -> Iterator[CollectionLayout]:
    """Every collection of the store: one delimited listing per tenant, not a full listing."""
    for tenant in list_children(store, TENANTS_PREFIX):
        for collection in list_children(store, f"{TENANTS_PREFIX}{tenant}/collections/"):
            try:
                yield CollectionLayout(tenant, collection)
            except ValueError:
                continue  # not written by the gateway: leave it alone


@dataclass
class ScanCursor:
    """Where the janitor's scan of one collection resumes, kept in Redis (`key`).

    `after`: the last image id of the previous pass's window (None: the next pass starts a
    cycle at the collection's first image). `version` and `lacking` carry across the windows
    of one cycle what marking a version indexed needs: the current version when the cycle
    started, and whether an image of a window seen so far lacked its record.
    """

    after: str | None = None
    version: str | None = None
    lacking: bool = False

    @staticmethod
    def key(layout: CollectionLayout) -> str:
        return f"{_CURSOR_PREFIX}{layout.tenant}/{layout.collection}"

    @classmethod
    def load(cls, client: Any, layout: CollectionLayout) -> ScanCursor:
        raw = client.get(cls.key(layout))
        if raw is None:
            return cls()
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            return cls()  # unreadable: start a cycle again (costs one more cycle, no harm)

    def save(self, client: Any, layout: CollectionLayout) -> None:
        client.set(self.key(layout), json.dumps(asdict(self)))


def _window(
    store: ObjectStore, layout: CollectionLayout, after: str | None, page: int
) -> tuple[dict[str, float], str | None]:
    """What one pass looks at in a collection (key → last write), and the last image id of
    its window (None: the window reached the collection's last image, a cycle ends).

    The small prefixes whole (models/, failures/, retired/, snapshots/); of images/ the
    objects of the images after `after` (a ListObjects from there), `page` objects and the
    rest of the last image's; of the feature records of the current and served versions the
    same images' (a ListObjects from `after`, stopped past the window). At 10⁷ objects a
    full listing took about 18 min on radosgw, longer than the janitor's interval; a window
    costs `page` / 1 000 list requests, and the next pass resumes after it.
    """
    objects: dict[str, float] = {}
    for prefix in (
        layout.models_prefix,
        layout.root + "failures/",
        layout.retired_prefix,
        layout.root + "snapshots/",
    ):
        objects.update(list_modified(store, prefix))
    images = layout.images_prefix
    # "~" sorts after every character of an image's object names: after all of its objects.
    start = None if after is None else f"{images}{after}/~"
    last = end = None
    for count, (key, modified) in enumerate(iter_modified(store, images, start)):
        image_id = key[len(images) :].split("/", 1)[0]
        if page > 0 and count >= page and image_id != last:
            end = last
            break
        objects[key] = modified
        last = image_id
    versions = {read_current_version(store, layout), read_indexed_version(store, layout)}
    for version in sorted(v for v in versions if v is not None):
        prefix = layout.features_prefix(version)
        start = None if after is None else f"{prefix}{after}.npz"
        for key, modified in iter_modified(store, prefix, start):
            image_id = layout.image_id_of_features(version, key)
            if end is not None and image_id is not None and image_id > end:
                break
            objects[key] = modified
    return objects, end


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


def _with_features(layout: CollectionLayout, version: str, objects: dict[str, float]) -> set[str]:
    prefix = layout.features_prefix(version)
    return {
        image_id
        for key in objects
        if key.startswith(prefix) and (image_id := layout.image_id_of_features(version, key))
    }


def _mark_indexed(
    store: ObjectStore,
    layout: CollectionLayout,
    objects: dict[str, float],
    report: SweepReport,
    cursor: ScanCursor,
    cycle_ends: bool,
) -> None:
    """Record the current version as indexed once its re-index finished: every complete image
    stored before it became current holds its record (an image stored since is indexed with
    it by its own upload task, `live_versions`). Uploads then stop being indexed with older
    versions too.

    A pass sees one window of the collection (`_window`): the verdict is carried over the
    windows of a cycle by `cursor` and given when the cycle ends, if the current version
    stayed the same throughout.
    """
    if cursor.after is None:  # a cycle starts
        cursor.version, cursor.lacking = None, False
    current = read_current_version(store, layout) if layout.current_model in objects else None
    if cursor.version is None:
        cursor.version = current
    elif cursor.version != current:
        cursor.lacking = True  # a newer version mid-cycle: the next cycle judges it
    if current is None or read_indexed_version(store, layout) == current:
        return
    cursor.lacking = cursor.lacking or _lacks(layout, current, objects)
    if cycle_ends and not cursor.lacking and write_indexed_version(store, layout, current):
        report.indexed_versions.append(current)
        log.info("reconciler: %s of %s holds every image: indexed", current, layout.root)


def _lacks(layout: CollectionLayout, current: str, objects: dict[str, float]) -> bool:
    """Whether an image of `objects` stored before `current` became current lacks its record
    (and was neither retired nor given up on)."""
    became_current = objects[layout.current_model]
    with_current = _with_features(layout, current, objects)
    for image_id, parts in _images(layout, objects).items():
        meta = f"{layout.images_prefix}{image_id}/meta.json"
        if meta not in parts or parts[meta] >= became_current or image_id in with_current:
            continue
        if _is_retired_key(layout, image_id, objects):
            continue  # never indexed again: a retired image holds no version back
        if layout.version_failure(current, image_id) in objects:
            continue  # gave up under this version (work.version_failed): served without it
        if layout.failure(image_id) not in objects:
            return True  # the re-index still has work
    return False


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
    """Queue again the index task of every image still lacking the record of the current or
    the served (indexed) version longer than the bound, unless its task is queued or running
    (`waiting_tasks`): what no heartbeat covers ("stored, not queued", a message Redis lost).

    The wait counts from when the image was stored, or for the current version's record of an
    image stored before that version became current (its re-index), from then.
    """
    if layout.current_model not in objects:
        return  # no model yet: uploads wait for the first training, nothing is lost
    version = read_current_version(store, layout)
    if version is None:
        return
    indexed = read_indexed_version(store, layout)
    served = indexed if indexed is not None and indexed != version else None
    with_current = _with_features(layout, version, objects)
    with_served = _with_features(layout, served, objects) if served else set()
    became_current = objects[layout.current_model]
    bound = settings.redelivery_bound_s
    waiting: set[str] | None = None  # read once, when the first image is overdue
    for image_id, parts in sorted(_images(layout, objects).items()):
        meta = f"{layout.images_prefix}{image_id}/meta.json"
        if meta not in parts or layout.failure(image_id) in objects:
            continue
        lacks_served = (
            served is not None
            and image_id not in with_served
            and layout.version_failure(served, image_id) not in objects
        )
        if (
            image_id in with_current or layout.version_failure(version, image_id) in objects
        ) and not lacks_served:
            continue  # indexed, or given up under this version (work.version_failed)
        if _is_retired_key(layout, image_id, objects):
            continue  # the owner retired it: it is not indexed on purpose
        report.waiting_images += 1
        since = parts[meta] if lacks_served else max(parts[meta], became_current)
        if now - since <= bound:
            continue
        if len(report.requeued_images) >= settings.reconcile_max_requeue:
            continue
        args = [layout.tenant, layout.collection, image_id]
        if waiting is None:
            waiting = waiting_tasks(leases.redis)
        if (
            InFlight.member(TASK_INDEX_IMAGE, args) in waiting
            or InFlight.member(TASK_REINDEX_COLLECTION, [*args[:2], version]) in waiting
        ):
            report.queued_behind += 1
            continue  # queued behind others, or running: late, not lost
        # At most once per bound per image: a backlog is not queued again and again.
        marker = f"{_REQUEUED_PREFIX}{layout.tenant}/{layout.collection}/{image_id}"
        if not leases.claim(marker, bound):
            continue
        send(TASK_INDEX_IMAGE, args)
        REQUEUED.labels(TASK_INDEX_IMAGE).inc()
        report.requeued_images.append(image_id)
        log.warning(
            "reconciler: image %s of %s waited %.0f s (> %.0f s) for its index; queued again",
            image_id,
            layout.root,
            now - since,
            bound,
        )


def _write_snapshots(
    store: ObjectStore,
    settings: IndexerSettings,
    layout: CollectionLayout,
    objects: dict[str, float],
    report: SweepReport,
    kept: dict[str, FeatureSnapshot] | None,
) -> None:
    """Consolidate the served versions' feature records into one snapshot each, once at
    least `snapshot_min_records` records are not in it: the search service's start-up then
    reads one object and the few newer records instead of one GET per record."""
    if settings.snapshot_min_records <= 0 or layout.current_model not in objects:
        return
    versions = {read_current_version(store, layout), read_indexed_version(store, layout)}
    kept = {} if kept is None else kept
    for version in sorted(v for v in versions if v is not None):
        key = layout.features_snapshot(version)
        snapshot = kept.get(key) if key in objects else None
        if snapshot is None and key in objects:
            try:
                snapshot = FeatureSnapshot.from_bytes(store.get(key))
            except (ObjectNotFound, ValueError, KeyError, OSError) as exc:
                log.warning("janitor: snapshot %s unreadable (%s); writing it again", key, exc)
        records = snapshot.records() if snapshot is not None else {}
        missing = sorted(_with_features(layout, version, objects) - set(records))
        if len(missing) < settings.snapshot_min_records:
            continue
        with ThreadPoolExecutor(settings.batch_io_threads) as pool:
            keys = [layout.features(version, image_id) for image_id in missing]
            read = pool.map(store.get, keys)
            records.update(
                (image_id, FeatureRecord.from_bytes(data))
                for image_id, data in zip(missing, read, strict=True)
            )
        dim = next(iter(records.values())).vector.shape[0]
        snapshot = FeatureSnapshot.of(version, records, dim)
        store.put(key, snapshot.to_bytes())
        kept[key] = snapshot
        report.snapshots[key] = len(snapshot.ids)
        log.info("janitor: snapshot of %s %s holds %d records", layout.root, version, len(records))


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
        self._snapshots: dict[str, FeatureSnapshot] = {}
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
        return sweep(self.store, self.send, self.leases, settings, snapshots=self._snapshots)

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
