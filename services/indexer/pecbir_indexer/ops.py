"""Operations hooks of the worker: metrics, request ids, probes and graceful shutdown.

Kubernetes stops a pod with SIGTERM and kills it `terminationGracePeriodSeconds` later. With
`REMAP_SIGTERM=SIGQUIT` in the environment, Celery answers SIGTERM with a *soft shutdown*: it
stops taking messages, lets running tasks go on for `PECBIR_SOFT_SHUTDOWN_S` seconds, then
cancels what is still running, which (late acks + reject on worker lost) puts those messages
back on their queue for another worker. Keep the grace period above the soft-shutdown time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from pydantic_settings import BaseSettings, SettingsConfigDict

from pecbir_contracts.layout import version_number
from pecbir_contracts.tasks import QUEUE_DEAD_LETTER, WORKER_QUEUES
from pecbir_indexer.runtime import feature_backend, get_runtime
from pecbir_indexer.settings import IndexerSettings
from pecbir_platform.observability import (
    Check,
    broker_check,
    instrument_celery,
    register_collector,
)


class WorkerOpsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PECBIR_", extra="ignore")

    # Seconds running tasks may go on after SIGTERM before they are handed back (0 = off).
    soft_shutdown_s: float = 0.0


class CachedModelCollector:
    """`pecbir_model_version{service="indexer"}`: the model versions this worker has loaded."""

    def describe(self) -> list:
        # No up-front names: search and indexer both report `pecbir_model_version`, each from
        # its own process; tests that load both into one registry must not clash.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        model = GaugeMetricFamily(
            "pecbir_model_version",
            "Model version number (vNNNN → NNNN) a service uses for a collection",
            labels=["service", "tenant", "collection", "role"],
        )
        from pecbir_indexer import runtime

        held = runtime._runtime
        newest: dict[tuple[str, str], int] = {}
        for tenant, collection, version in list(held._models) if held else []:
            number = version_number(version)
            newest[(tenant, collection)] = max(number, newest.get((tenant, collection), 0))
        for (tenant, collection), number in newest.items():
            model.add_metric(["indexer", tenant, collection, "indexing"], number)
        yield model


class FeatureBackendCollector:
    """`pecbir_feature_backend_info{service="indexer",backend,device}` = 1: where this worker
    computes Fisher vectors (IndexerSettings.feature_backend / feature_device)."""

    def __init__(self, settings: IndexerSettings) -> None:
        self.settings = settings

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "pecbir_feature_backend_info",
            "Feature back end of this worker (numpy reference or torch on a device)",
            labels=["service", "backend", "device"],
        )
        try:
            backend, _, device = feature_backend(self.settings).partition(":")
        except (ImportError, ValueError):  # readiness says so; the metric says what was asked
            backend, device = self.settings.feature_backend, "unavailable"
        info.add_metric(["indexer", backend, device or "cpu"], 1)
        yield info


def readiness_checks(settings: IndexerSettings) -> dict[str, Check]:
    def store() -> bool:
        get_runtime().store.exists("healthz/probe")
        return True

    def models() -> bool:
        import pecore.pipeline  # noqa: F401  (every task loads a pipeline)

        return True

    def features() -> bool:
        feature_backend(settings)  # torch installed and the device there, if asked for
        return True

    return {
        "broker": broker_check(settings.broker_url),
        "store": store,
        "models": models,
        "features": features,
    }


def start_reconciler(celery_app: Any, settings: IndexerSettings) -> None:
    """Run the reconciler and janitor (pecbir_indexer.recovery) in every worker's main
    process once the worker is ready; a Redis lease makes one of them act per interval."""
    from celery import signals

    if settings.reconcile_interval_s <= 0:
        return

    def on_ready(**_kw: Any) -> None:
        import redis

        from pecbir_contracts.tasks import TASK_INDEX_IMAGE, TASK_QUEUES
        from pecbir_indexer.recovery import InFlight, Reconciler, RedisLeases, to_front

        client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)

        def send(task_name: str, args: Any) -> None:
            queue = TASK_QUEUES[task_name]
            sent = celery_app.send_task(task_name, args=list(args), queue=queue)
            if task_name == TASK_INDEX_IMAGE:  # an upload that waited a bound: next in line
                to_front(client, queue, sent.id)

        store = get_runtime().store

        def give_up(task_name: str, args: Any, reason: str) -> None:
            from pecbir_indexer.tasks import dead_letter

            dead_letter(task_name, "reconciler", list(args), reason)

        leases, in_flight = RedisLeases(client), InFlight(client)
        Reconciler(settings, store, send, leases, in_flight, give_up).start()

    signals.worker_ready.connect(on_ready, weak=False)


def instrument(celery_app: Any, settings: IndexerSettings) -> None:
    ops = WorkerOpsSettings()
    start_reconciler(celery_app, settings)
    if ops.soft_shutdown_s > 0:
        celery_app.conf.update(
            worker_soft_shutdown_timeout=ops.soft_shutdown_s,
            worker_enable_soft_shutdown_on_idle=False,
        )
    register_collector("indexer_models", CachedModelCollector())
    register_collector("indexer_feature_backend", FeatureBackendCollector(settings))
    instrument_celery(
        celery_app,
        "indexer",
        broker_url=settings.broker_url,
        queues=(*WORKER_QUEUES, QUEUE_DEAD_LETTER),
        checks=readiness_checks(settings),
    )
