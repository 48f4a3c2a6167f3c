"""How the gateway hands work to the indexer: Celery tasks by name (it never imports them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from pecbir_contracts.tasks import TASK_QUEUES


class DispatchError(RuntimeError):
    """The task could not be queued (broker down)."""


class TaskDispatcher(Protocol):
    def send(self, task_name: str, args: Sequence[object]) -> None: ...


class CeleryDispatcher:
    """Queues tasks on the Redis broker, routed by the contract's queue table."""

    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        self._celery = Celery("pecbir-gateway", broker=broker_url)
        self._celery.conf.update(
            broker_connection_retry_on_startup=True,
            broker_transport_options={"max_retries": 2, "interval_start": 0.1},
            task_ignore_result=True,
        )

    def send(self, task_name: str, args: Sequence[object]) -> None:
        try:
            self._celery.send_task(
                task_name, args=list(args), queue=TASK_QUEUES[task_name], retry=False
            )
        except Exception as exc:  # kombu raises OperationalError and friends
            raise DispatchError(f"cannot queue {task_name}: {exc}") from exc


class CallableDispatcher:
    """Runs a task through a callable (embedded mode: in-process, eager execution)."""

    def __init__(self, run: Callable[[str, Sequence[object]], None]) -> None:
        self._run = run

    def send(self, task_name: str, args: Sequence[object]) -> None:
        self._run(task_name, args)
