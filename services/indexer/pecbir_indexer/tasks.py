"""The indexer's Celery tasks: thin wrappers of `pecbir_indexer.work`, with retries and DLQ.

The app and its configuration are in `pecbir_indexer.celery`; why the settings are what they
are is said there.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError
from prometheus_client import Counter

from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.records import write_failure
from pecbir_contracts.store import StorageError
from pecbir_contracts.tasks import (
    QUEUE_DEAD_LETTER,
    QUEUE_INDEX,
    TASK_DEAD_LETTER,
    TASK_INDEX_BATCH,
    TASK_INDEX_CHUNK,
    TASK_INDEX_IMAGE,
    TASK_REINDEX_COLLECTION,
    TASK_RETIRE_IMAGE,
    TASK_TRAIN_MODEL,
)
from pecbir_indexer import batch, work
from pecbir_indexer.celery import app, settings
from pecbir_indexer.recovery import InFlight, train_lease
from pecbir_indexer.runtime import get_runtime

log = logging.getLogger(__name__)
PREEMPTED = Counter(
    "pecbir_reindex_chunks_preempted",
    "Re-index chunks that gave way to waiting uploads (the rest of the chunk queued again)",
)
# Errors that mean "Redis is unreachable", not "this task is bad".
BROKER_DOWN = (redis.ConnectionError, redis.TimeoutError, OperationalError)


def dead_letter(task_name: str, task_id: str, args: list[Any], reason: str) -> None:
    """Record a poison message in the store and park it on the dead-letter queue."""
    rt = get_runtime()
    try:
        if task_name in (TASK_INDEX_IMAGE,) and len(args) >= 3:
            layout = CollectionLayout(args[0], args[1])
            write_failure(rt.store, layout.failure(args[2]), reason, task=task_name)
        elif task_name == TASK_TRAIN_MODEL and len(args) >= 3:
            layout = CollectionLayout(args[0], args[1])
            write_failure(rt.store, layout.model_failure(args[2]), reason, task=task_name)
        elif task_name in (TASK_INDEX_CHUNK, TASK_INDEX_BATCH) and len(args) >= 4:
            layout = CollectionLayout(args[0], args[1])
            for image_id in args[3]:
                write_failure(rt.store, layout.failure(image_id), reason, task=task_name)
    except Exception as exc:  # the DLQ copy below must still happen
        log.error("could not record failure of %s in the store: %s", task_id, exc)
    try:
        app.send_task(
            TASK_DEAD_LETTER,
            args=[task_name, task_id, list(args), reason],
            queue=QUEUE_DEAD_LETTER,
            retry=False,
        )
    except Exception as exc:
        log.error("could not dead-letter %s: %s", task_id, exc)
    log.error("dead-lettered %s %s: %s", task_name, task_id, reason)


@cache
def _lease_redis() -> Any:
    return redis.Redis.from_url(settings.broker_url, socket_timeout=5)


@cache
def _in_flight() -> InFlight:
    return InFlight(_lease_redis())


class IndexerTask(Task):
    """Retry storage errors with backoff; dead-letter everything that fails for good."""

    autoretry_for = (StorageError,)
    retry_backoff = 1
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = settings.max_retries
    acks_late = True
    reject_on_worker_lost = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.request.is_eager or not self.request.id or settings.reconcile_interval_s <= 0:
                return self._run_counted(*args, **kwargs)
            # A heartbeat while it runs: if this worker is killed, the reconciler queues the
            # task again `redelivery_bound_s` later instead of the visibility timeout's hour.
            every = settings.redelivery_bound_s / 4
            with _in_flight().running(self.name, args, every) as watch:
                try:
                    return self._run_counted(*args, **kwargs)
                except Retry:
                    watch.keep = True  # the retry is due later; watched until it runs
                    raise
        except BROKER_DOWN as exc:
            # Redis (broker and event stream) went away mid-task: not the message's fault, so
            # no dead letter. Hand it back: requeued if Redis is back by now, else it stays
            # unacknowledged in Redis and is redelivered after the visibility timeout.
            log.warning("broker/event stream lost during %s: %s; handing it back", self.name, exc)
            raise Reject(exc, requeue=True) from exc

    def _run_counted(self, *args: Any, **kwargs: Any) -> Any:
        task_id = self.request.id
        if task_id and not self.request.is_eager:
            deliveries = get_runtime().bus.incr_attempts(task_id)
            if deliveries > settings.max_deliveries:
                dead_letter(self.name, task_id, list(args), f"delivered {deliveries} times")
                return None
        result = super().__call__(*args, **kwargs)
        if task_id and not self.request.is_eager:
            get_runtime().bus.clear_attempts(task_id)
        return result

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # type: ignore[no-untyped-def]
        dead_letter(self.name, task_id, list(args), f"{type(exc).__name__}: {exc}")


def _test_delay(task: str = "index_image") -> None:
    """The fault-injection hook (see IndexerSettings.test_index_delay_file)."""
    delay_files = {
        "train_model": settings.test_train_delay_file,
        "index_chunk": settings.test_chunk_delay_file,
    }
    delay_file = delay_files.get(task, settings.test_index_delay_file)
    if delay_file:
        with contextlib.suppress(FileNotFoundError, ValueError):
            seconds = float(Path(delay_file).read_text())
            log.warning("test hook: %s sleeps %.1f s", task, seconds)
            time.sleep(seconds)


@app.task(base=IndexerTask, name=TASK_INDEX_IMAGE, throws=(work.PoisonMessage,))
def index_image(tenant: str, collection: str, image_id: str) -> str:
    _test_delay()
    rt = get_runtime()
    outcome = work.index_image(rt, tenant, collection, image_id)
    for version, reason in outcome.failed:  # searchable already; a newer version failed
        _version_failed(rt, tenant, collection, version, image_id, reason)
    return outcome.state


def _version_failed(
    rt: Any, tenant: str, collection: str, version: str, image_id: str, reason: str
) -> None:
    """Count a failed attempt of `image_id` under `version`: below the bound it is queued
    again for that version alone (a chunk of one), at the bound recorded as failed for it
    (`work.version_failed`)."""
    if not work.version_failed(rt, tenant, collection, version, image_id, reason):
        index_chunk.apply_async(args=[tenant, collection, version, [image_id]])


@app.task(base=IndexerTask, name=TASK_RETIRE_IMAGE)
def retire_image(tenant: str, collection: str, image_id: str) -> bool:
    """Announce a retired image to the search services (drop its vector everywhere)."""
    return work.retire_image(get_runtime(), tenant, collection, image_id)


def _uploads_waiting() -> bool:
    """Whether index work of uploads waits in its queue (kombu's Redis list of the queue)."""
    try:
        return bool(_lease_redis().llen(QUEUE_INDEX))
    except BROKER_DOWN:
        return False  # Redis down: nothing can be taken from the queue anyway; go on


@app.task(base=IndexerTask, name=TASK_INDEX_CHUNK, throws=(work.PoisonMessage,), bind=True)
def index_chunk(
    self: Task, tenant: str, collection: str, version: str, image_ids: list[str]
) -> int:
    """Index a re-index chunk, giving way to uploads between its images.

    A worker holds a task until it returns, and the queue order only decides which task it
    takes next; a chunk of many images held uploads back that long (issue 15: 300 uploads
    arriving during two re-indexes waited more than 2 min). So after each image, if an
    upload's index task waits, the rest of the chunk is queued again as a chunk of its own
    and this task returns: the worker takes the upload next. Nothing is skipped (the rest is
    queued before this task is acknowledged) and nothing is done twice (the rest holds only
    the images not done here; if the worker dies between the two, the redelivered original
    finds the records of the images it did and only publishes them again). At least one
    image per delivery: a re-index always progresses.
    """
    rt = get_runtime()
    failed = 0
    for done, image_id in enumerate(image_ids):
        if (
            done
            and rt.settings.reindex_give_way
            and not self.request.is_eager
            and _uploads_waiting()
        ):
            rest = image_ids[done:]
            index_chunk.apply_async(args=[tenant, collection, version, rest])
            PREEMPTED.inc()
            log.info(
                "re-index chunk of %s/%s %s gives way to uploads after %d images: %d queued again",
                tenant,
                collection,
                version,
                done,
                len(rest),
            )
            return done - failed
        _test_delay("index_chunk")
        try:
            work.index_image(rt, tenant, collection, image_id, version)
        except Exception as exc:
            if work.is_transient(exc) or isinstance(exc, BROKER_DOWN):
                raise  # the store or Redis, not the image: the whole chunk is retried
            # One bad image must not block its chunk (nor, for good, the swap to `version`):
            # count the attempt, go on.
            failed += 1
            _version_failed(rt, tenant, collection, version, image_id, work.describe_error(exc))
    return len(image_ids) - failed


@app.task(base=IndexerTask, name=TASK_INDEX_BATCH, throws=(work.PoisonMessage,))
def index_batch(tenant: str, collection: str, version: str, image_ids: list[str]) -> int:
    """A re-index batch with one feature computation (the GPU workers' task)."""
    _test_delay("index_batch")
    rt = get_runtime()
    outcome = batch.index_batch(rt, tenant, collection, version, image_ids)
    for image_id, reason in outcome.poison.items():
        # One bad image must not block its batch: count the attempt, go on.
        _version_failed(rt, tenant, collection, version, image_id, reason)
    return len(outcome.indexed) + len(outcome.already_indexed)


@contextlib.contextmanager
def _training_lease(tenant: str, collection: str, version: str, eager: bool):
    """Yields False when another worker trains this version now (its lease is held).

    The lease expires `train_lease_s` after its holder stops renewing it (killed), so the
    reconciler may then queue the version again; while it is held, nobody trains it twice.
    """
    if eager:  # embedded mode: one process, no broker
        yield True
        return
    # thread_local=False: the renewing thread below must see the token the task thread took
    # (redis-py keeps it thread-local by default, and every renewal then failed: the lease
    # lapsed after train_lease_s and the reconciler started the same training a second time).
    lease = _lease_redis().lock(
        train_lease(tenant, collection, version),
        timeout=settings.train_lease_s,
        thread_local=False,
    )
    if not lease.acquire(blocking=False):
        yield False
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(settings.train_lease_s / 3):
            try:
                lease.reacquire()
            except Exception as exc:  # Redis down a moment: the next renewal tries again
                log.warning("could not renew the training lease of %s: %s", version, exc)

    renewer = threading.Thread(target=renew, name="pecbir-train-lease", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join(5)
        with contextlib.suppress(Exception):  # expired or Redis down: it lapses by itself
            lease.release()


@app.task(base=IndexerTask, name=TASK_TRAIN_MODEL, throws=(work.PoisonMessage,), bind=True)
def train_model(self: Task, tenant: str, collection: str, version: str) -> str:
    with _training_lease(tenant, collection, version, bool(self.request.is_eager)) as mine:
        if not mine:
            log.warning(
                "training %s of %s/%s is running elsewhere (lease held); not a second time",
                version,
                tenant,
                collection,
            )
            return version
        _test_delay("train_model")
        manifest = work.train_model(get_runtime(), tenant, collection, version)
    reindex_collection.apply_async(args=[tenant, collection, version])
    return manifest.version


@app.task(base=IndexerTask, name=TASK_REINDEX_COLLECTION)
def reindex_collection(tenant: str, collection: str, version: str) -> int:
    """Fan out: one `index_chunk` task per chunk of images still lacking `version` features,
    or with `reindex_gpu_batch` set, one `index_batch` task per batch for the GPU workers."""
    rt = get_runtime()
    size = rt.settings.reindex_gpu_batch
    task = index_batch if size > 0 else index_chunk
    chunks = work.reindex_plan(rt, tenant, collection, version, size if size > 0 else None)
    for chunk in chunks:
        task.apply_async(args=[tenant, collection, version, chunk])
    return len(chunks)


TASKS = {
    TASK_INDEX_IMAGE: index_image,
    TASK_RETIRE_IMAGE: retire_image,
    TASK_INDEX_CHUNK: index_chunk,
    TASK_INDEX_BATCH: index_batch,
    TASK_TRAIN_MODEL: train_model,
    TASK_REINDEX_COLLECTION: reindex_collection,
}


def use_eager_mode() -> None:
    """Embedded mode: every task runs in the calling process, at once (Celery eager mode).

    Only for the single-process demo and unit tests: no broker, so no acks, redelivery or
    parallel workers; the dead-letter copy goes to Celery's in-memory transport.
    """
    app.conf.update(task_always_eager=True, task_eager_propagates=False, broker_url="memory://")


def run_eagerly(task_name: str, args: list[Any]) -> None:
    """Execute a task by name in this process (after `use_eager_mode`)."""
    TASKS[task_name].apply(args=list(args), throw=False)
