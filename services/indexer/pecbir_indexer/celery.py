"""The indexer's Celery app and its configuration (`celery -A pecbir_indexer.celery:app worker`).

Celery's own layout: this module makes the app, `pecbir_indexer.tasks` defines the tasks
(imported by the worker at start through ``include``), `pecbir_indexer.work` does the work.

Reliability settings: late acks and requeue on worker loss (a task interrupted by a crash runs
again), uploads before re-index chunks (queue order), prefetch 1 (a slow training never holds
indexing messages hostage), retries with exponential backoff on storage errors, and a
dead-letter queue for poison messages: a task that failed for good, or was delivered more
than `max_deliveries` times, is recorded in the object store (`failures/…`) and copied to
`QUEUE_DEAD_LETTER`, which no worker consumes.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pecbir_contracts.tasks import TASK_QUEUES, WORKER_QUEUES
from pecbir_indexer import ops
from pecbir_indexer.settings import IndexerSettings
from pecbir_platform.config import settings_from_env

__all__ = ["app", "settings"]

settings = settings_from_env(IndexerSettings)

app = Celery("pecbir-indexer", broker=settings.broker_url, include=["pecbir_indexer.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_routes={name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
    task_queues=[Queue(name) for name in WORKER_QUEUES],
    task_default_queue=WORKER_QUEUES[0],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # A lost worker's unacked message comes back after this many seconds (Redis transport).
    # kombu sweeps for such messages every `unacked_restore_interval` s but by default scans
    # only on every 10th sweep; scan on each (one ZRANGE on the unacked index).
    # "priority": a worker takes from its queues in the order it consumes them (`-Q
    # pecbir.index,pecbir.reindex,…`), so an upload's index task never waits behind re-index
    # chunks (kombu's default round-robin gave each queue turns: behind a re-index an upload
    # waited a chunk per task ahead of it, minutes under load, issue 15). A re-index
    # progresses whenever no upload waits.
    broker_transport_options={
        "queue_order_strategy": "priority",
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s)),
        "unacked_restore_throttle": 1,
    },
)

ops.instrument(app, settings)
