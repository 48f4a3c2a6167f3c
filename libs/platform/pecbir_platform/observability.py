"""Metrics, structured logs and probes, the same for every service.

- Prometheus metrics (`prometheus_client`): HTTP request counts and latency per *route template*
  (never the raw path, which holds image ids), task durations and failures, queue depth (read
  from the broker at scrape time). Vectors held and model versions in use are collected by
  the services themselves (`pecbir_search.ops`, `pecbir_indexer.ops`).
- JSON logs, one object per line, carrying a request id. The id arrives in (or is minted for)
  an HTTP request (`X-Request-ID`), travels with a Celery task in a message header and with an
  event on the stream, so one upload can be followed gateway → indexer → search.
- Probes: `/healthz` (the process answers) and `/readyz` (the dependencies it needs answer:
  broker, store, model). A Celery worker has no web server, so `start_ops_server` serves the
  same three paths from a thread.

Logs never carry image data: binary arguments are replaced by their size, and extra fields
whose names suggest pixel data or patient identity are dropped (see `JsonFormatter`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from pydantic_settings import BaseSettings, SettingsConfigDict

from pecbir_contracts.request_ids import (
    REQUEST_ID_FIELD,
    REQUEST_ID_HEADER,
    clean_request_id,
    current_request_id,
    new_request_id,
    request_context,
    reset_request_id,
    set_request_id,
)

__all__ = [
    "HTTP_IN_FLIGHT",
    "HTTP_LATENCY",
    "HTTP_REQUESTS",
    "REQUEST_ID_FIELD",
    "REQUEST_ID_HEADER",
    "TASK_DURATION",
    "TASK_FAILURES",
    "Check",
    "JsonFormatter",
    "ObservabilitySettings",
    "QueueDepthCollector",
    "broker_check",
    "clean_request_id",
    "configure_logging",
    "current_request_id",
    "httpx_request_id_hook",
    "instrument_app",
    "instrument_celery",
    "metrics_registry",
    "new_request_id",
    "observe_request",
    "ops_wsgi_app",
    "propagate_request_ids_through_celery",
    "register_collector",
    "render_metrics",
    "request_context",
    "run_checks",
    "start_ops_server",
    "store_check",
]


class ObservabilitySettings(BaseSettings):
    """Environment of the observability layer (prefix PECBIR_), shared by all services."""

    model_config = SettingsConfigDict(env_prefix="PECBIR_", extra="ignore")

    # json | text; unset: leave logging as the process set it up (tests, CLI).
    log_format: str | None = None
    log_level: str = "INFO"
    # Port of the worker's ops server (/metrics, /healthz, /readyz); 0 = none.
    ops_port: int = 0


# -- request ids (the convention itself is in pecbir_contracts.request_ids) ---------------------


def httpx_request_id_hook(request: Any) -> None:
    """httpx `event_hooks={"request": [...]}` hook: forward the current request id."""
    rid = current_request_id()
    if rid and REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = rid


# -- logs ------------------------------------------------------------------------------------

# Extra fields with these names never reach a log line: pixel data, keys and patient identity.
_DENIED_FIELDS = re.compile(
    r"(image|pixel|cipher|mask|plain|png|dicom|bytes|key|secret|token|password|patient|name|"
    r"birth|vector)",
    re.IGNORECASE,
)
_STANDARD_FIELDS = frozenset(
    set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__)
    | {"message", "asctime", "taskName"}
)


def _describe(value: object) -> object:
    """Arguments of a log call: binary data and arrays become a description of their size."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"<array {tuple(shape)} {value.dtype}>"
    return value


def _safe_message(record: logging.LogRecord) -> str:
    args = record.args
    if isinstance(args, tuple):
        args = tuple(_describe(a) for a in args)
    elif isinstance(args, Mapping):
        args = {k: _describe(v) for k, v in args.items()}
    msg = _describe(record.msg)
    try:
        return str(msg) % args if args else str(msg)
    except (TypeError, ValueError):
        return f"{msg} {args!r}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, service, request id, message, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "request_id": getattr(record, "request_id", None) or current_request_id(),
            "msg": _safe_message(record),
        }
        for name, value in record.__dict__.items():
            if name in _STANDARD_FIELDS or name in entry or name.startswith("_"):
                continue
            if _DENIED_FIELDS.search(name):
                continue
            value = _describe(value)
            if isinstance(value, str | int | float | bool) or value is None:
                entry[name] = value
        if record.exc_info:
            exc_type, exc, _tb = record.exc_info
            entry["error"] = f"{exc_type.__name__ if exc_type else 'Error'}: {exc}"
            # Frames only (file, line, function): locals and arguments stay out of the log.
            entry["trace"] = [
                f"{frame.filename}:{frame.lineno} {frame.name}"
                for frame in traceback.extract_tb(record.exc_info[2])
            ][-10:]
        return json.dumps(entry, default=str, ensure_ascii=False)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id()
        return True


def configure_logging(
    service: str, settings: ObservabilitySettings | None = None, stream: Any = None
) -> logging.Handler:
    """Route the root logger to one handler (JSON or text) on stderr; idempotent per service."""
    settings = settings or ObservabilitySettings()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pecbir", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._pecbir = True  # type: ignore[attr-defined]
    if settings.log_format != "text":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    handler.addFilter(_RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler


# -- metrics ---------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

HTTP_REQUESTS = Counter(
    "pecbir_http_requests",
    "HTTP requests answered, by route template and status code",
    ["service", "method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "pecbir_http_request_duration_seconds",
    "Time from request to the last byte of the answer",
    ["service", "method", "route"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(
    "pecbir_http_requests_in_flight",
    "Requests being answered",
    ["service"],
    multiprocess_mode="livesum",
)
TASK_DURATION = Histogram(
    "pecbir_task_duration_seconds",
    "Run time of Celery tasks, by task name and outcome",
    ["task", "outcome"],
    buckets=_TASK_BUCKETS,
)
TASK_FAILURES = Counter(
    "pecbir_task_failures",
    "Tasks that raised, by task name and exception class",
    ["task", "error"],
)


def observe_request(service: str, method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(service, method, route, str(status)).inc()
    HTTP_LATENCY.labels(service, method, route).observe(seconds)


class QueueDepthCollector:
    """`pecbir_queue_depth{queue=…}`: length of each Celery queue (Redis list), read per scrape."""

    def __init__(self, broker_url: str, queues: Iterable[str]) -> None:
        self.broker_url = broker_url
        self.queues = tuple(queues)
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(
                self.broker_url, socket_timeout=1.0, socket_connect_timeout=1.0
            )
        return self._client

    def depths(self) -> dict[str, int]:
        pipe = self._redis().pipeline()
        for queue in self.queues:
            pipe.llen(queue)
        return dict(zip(self.queues, (int(n) for n in pipe.execute()), strict=True))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "pecbir_queue_depth", "Messages waiting in a Celery queue", labels=["queue"]
        )
        up = GaugeMetricFamily("pecbir_broker_up", "1 if the broker answered the last scrape")
        try:
            for queue, n in self.depths().items():
                depth.add_metric([queue], n)
            up.add_metric([], 1)
        except Exception:
            up.add_metric([], 0)
        yield depth
        yield up


def metrics_registry() -> CollectorRegistry:
    """The registry to expose: the process's own, or all processes' in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        for collector in _extra_collectors.values():
            registry.register(collector)
        return registry
    return REGISTRY


_extra_collectors: dict[str, Any] = {}
_collectors_lock = threading.Lock()


def register_collector(name: str, collector: Any) -> None:
    """Expose a scrape-time collector (queue depth, index size, …) under `name`.

    A later collector of the same name replaces the earlier one (one per process in service
    deployments; tests build many apps in one process).
    """
    with _collectors_lock:
        previous = _extra_collectors.pop(name, None)
        if previous is not None:
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(previous)
        _extra_collectors[name] = collector
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            REGISTRY.register(collector)


def render_metrics() -> tuple[bytes, str]:
    return generate_latest(metrics_registry()), CONTENT_TYPE_LATEST


# -- readiness checks ------------------------------------------------------------------------

Check = Callable[[], object]


def run_checks(checks: Mapping[str, Check]) -> tuple[bool, dict[str, str]]:
    """Run every check; a check fails by raising (or returning False)."""
    results: dict[str, str] = {}
    ready = True
    for name, check in checks.items():
        try:
            outcome = check()
        except Exception as exc:
            ready = False
            results[name] = f"fail: {type(exc).__name__}: {exc}"[:300]
            continue
        if outcome is False:
            ready = False
            results[name] = "fail"
        else:
            results[name] = "ok"
    return ready, results


def broker_check(url: str) -> Check:
    """The Redis broker answers PING (with the credentials in `url`)."""
    client: list[Any] = []

    def check() -> bool:
        if not client:
            import redis

            client.append(redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0))
        return bool(client[0].ping())

    return check


def store_check(store: Any) -> Check:
    """The object store answers a metadata request (a missing key is an answer too)."""

    def check() -> bool:
        store.exists("healthz/probe")
        return True

    return check


# -- FastAPI ---------------------------------------------------------------------------------


class _ObservabilityMiddleware:
    """Pure ASGI middleware: request id in and out, metrics and an access line per request."""

    def __init__(self, app: Any, service: str) -> None:
        self.app = app
        self.service = service
        self.log = logging.getLogger(f"pecbir.access.{service}")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        status = 500
        started = time.perf_counter()
        with request_context(incoming) as rid:

            async def send_with_id(message: dict) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    headers = list(message.get("headers", []))
                    headers.append((REQUEST_ID_HEADER.lower().encode(), rid.encode()))
                    message = {**message, "headers": headers}
                await send(message)

            HTTP_IN_FLIGHT.labels(self.service).inc()
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                HTTP_IN_FLIGHT.labels(self.service).dec()
                elapsed = time.perf_counter() - started
                route = _route_template(scope)
                method = scope.get("method", "?")
                observe_request(self.service, method, route, status, elapsed)
                if route not in _QUIET_ROUTES:
                    self.log.info(
                        "%s %s %d %.1f ms",
                        method,
                        route,
                        status,
                        elapsed * 1000,
                        extra={"route": route, "status": status, "duration_ms": elapsed * 1000},
                    )


_QUIET_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})


def _route_template(scope: dict) -> str:
    """The matched route's path template ("/v1/collections/{collection}/…"), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "<unmatched>"


def instrument_app(app: Any, service: str, checks: Mapping[str, Check] | None = None) -> None:
    """Add request ids, metrics and the `/metrics` and `/readyz` endpoints to a FastAPI app.

    `checks` are evaluated per `/readyz` call; keep them cheap (a PING, a HEAD request).
    """
    from fastapi import Response
    from fastapi.responses import JSONResponse

    settings = ObservabilitySettings()
    if settings.log_format:
        configure_logging(service, settings)
    propagate_request_ids_through_celery()
    app.add_middleware(_ObservabilityMiddleware, service=service)
    ready_checks = dict(checks or {})

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        ready, results = run_checks(ready_checks)
        return JSONResponse(
            status_code=200 if ready else 503,
            content={"status": "ready" if ready else "not ready", "checks": results},
        )


# -- Celery ----------------------------------------------------------------------------------

_celery_lock = threading.Lock()
_celery_connected = False
_task_started: dict[str, float] = {}


def _inject_request_id(headers: dict | None = None, **_kw: Any) -> None:
    rid = current_request_id()
    if headers is not None and rid and REQUEST_ID_FIELD not in headers:
        headers[REQUEST_ID_FIELD] = rid


def _task_prerun(task_id: str | None = None, task: Any = None, **_kw: Any) -> None:
    rid = clean_request_id(getattr(task.request, REQUEST_ID_FIELD, None)) if task else None
    if rid is None and task is not None:
        headers = getattr(task.request, "headers", None) or {}
        rid = clean_request_id(headers.get(REQUEST_ID_FIELD))
    token = set_request_id(rid or new_request_id())
    if task is not None:
        task.request._pecbir_rid_token = token
    if task_id:
        _task_started[task_id] = time.perf_counter()


def _task_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_kw: Any
) -> None:
    started = _task_started.pop(task_id, None) if task_id else None
    if started is not None and task is not None:
        outcome = (state or "unknown").lower()
        TASK_DURATION.labels(task.name, outcome).observe(time.perf_counter() - started)
    token = getattr(task.request, "_pecbir_rid_token", None) if task is not None else None
    if token is not None:
        with contextlib.suppress(ValueError):
            reset_request_id(token)


def _task_failure(sender: Any = None, exception: BaseException | None = None, **_kw: Any) -> None:
    name = getattr(sender, "name", "unknown")
    TASK_FAILURES.labels(name, type(exception).__name__ if exception else "unknown").inc()


def propagate_request_ids_through_celery() -> None:
    """Connect the Celery signals (once per process): ids go out with every published task
    (gateway and workers alike) and are restored, with task metrics, around every run."""
    global _celery_connected
    from celery import signals

    with _celery_lock:
        if _celery_connected:
            return
        signals.before_task_publish.connect(_inject_request_id, weak=False)
        signals.task_prerun.connect(_task_prerun, weak=False)
        signals.task_postrun.connect(_task_postrun, weak=False)
        signals.task_failure.connect(_task_failure, weak=False)
        _celery_connected = True


def instrument_celery(
    celery_app: Any,
    service: str,
    *,
    broker_url: str,
    queues: Iterable[str],
    checks: Mapping[str, Check] | None = None,
    settings: ObservabilitySettings | None = None,
) -> None:
    """Task metrics and request ids for a worker; its ops server starts with the worker."""
    from celery import signals

    settings = settings or ObservabilitySettings()
    propagate_request_ids_through_celery()
    register_collector("queue_depth", QueueDepthCollector(broker_url, queues))
    ready_checks = dict(checks or {})

    def on_worker_init(**_kw: Any) -> None:
        if settings.log_format:
            configure_logging(service, settings)
        if settings.ops_port:
            start_ops_server(settings.ops_port, ready_checks)

    signals.worker_init.connect(on_worker_init, weak=False)


# -- ops server for processes without a web framework ----------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def process_request(self, request: Any, client_address: Any) -> None:
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def ops_wsgi_app(checks: Mapping[str, Check]) -> Callable:
    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body, content_type = render_metrics()
            start_response("200 OK", [("Content-Type", content_type)])
            return [body]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"status":"ok"}']
        if path == "/readyz":
            ready, results = run_checks(checks)
            body = json.dumps(
                {"status": "ready" if ready else "not ready", "checks": results}
            ).encode()
            status = "200 OK" if ready else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


def start_ops_server(port: int, checks: Mapping[str, Check], host: str = "0.0.0.0") -> WSGIServer:
    """Serve /metrics, /healthz and /readyz from a daemon thread; returns the server."""
    server = make_server(
        host, port, ops_wsgi_app(checks), _ThreadingWSGIServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="pecbir-ops", daemon=True).start()
    return server
