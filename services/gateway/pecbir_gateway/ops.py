"""Operations hooks of the gateway: metrics, request ids and readiness checks."""

from __future__ import annotations

from fastapi import FastAPI

from pecbir_contracts.tasks import QUEUE_DEAD_LETTER, WORKER_QUEUES
from pecbir_gateway.deps import GatewayContext
from pecbir_gateway.dispatch import CeleryDispatcher
from pecbir_platform.observability import (
    Check,
    QueueDepthCollector,
    broker_check,
    httpx_request_id_hook,
    instrument_app,
    register_collector,
    store_check,
)


def readiness_checks(context: GatewayContext) -> dict[str, Check]:
    """Store reachable, and the broker too when tasks go through one. The search service is
    not a condition: uploads must keep working while it restarts."""
    checks: dict[str, Check] = {"store": store_check(context.store)}
    if isinstance(context.dispatcher, CeleryDispatcher):
        checks["broker"] = broker_check(context.settings.broker_url)
    return checks


def instrument(app: FastAPI, context: GatewayContext) -> None:
    hooks = context.search.event_hooks
    if httpx_request_id_hook not in hooks.get("request", []):
        context.search.event_hooks = {
            **hooks,
            "request": [*hooks.get("request", []), httpx_request_id_hook],
        }
    if isinstance(context.dispatcher, CeleryDispatcher):
        # The gateway always runs, the workers may be scaled to zero: it reports the queues.
        queues = (*WORKER_QUEUES, QUEUE_DEAD_LETTER)
        register_collector("queue_depth", QueueDepthCollector(context.settings.broker_url, queues))
    instrument_app(app, "gateway", readiness_checks(context))
