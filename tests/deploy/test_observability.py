"""Metrics, JSON logs with request ids, and readiness probes of the services."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from pecbir_contracts.events import VectorEvent, decode_event, encode_event
from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.tasks import QUEUE_INDEX, QUEUE_TRAIN, TASK_INDEX_IMAGE
from pecbir_gateway.app import create_app as create_gateway
from pecbir_gateway.dispatch import CeleryDispatcher
from pecbir_gateway.settings import GatewaySettings
from pecbir_platform.bus import InMemoryBus
from pecbir_platform.observability import (
    REQUEST_ID_FIELD,
    REQUEST_ID_HEADER,
    JsonFormatter,
    ObservabilitySettings,
    QueueDepthCollector,
    configure_logging,
    current_request_id,
    propagate_request_ids_through_celery,
    request_context,
    start_ops_server,
)
from pecbir_platform.store import FilesystemStore
from pecbir_search.app import create_app as create_search
from pecbir_search.engine import CollectionState, Version
from pecbir_search.index import ExactVectorIndex as VectorIndex
from pecbir_search.settings import SearchSettings
from tests.services.conftest import RecordingDispatcher
from tests.services.helpers import TOKEN_SECRET, auth, blob_image, upload_files

URL = "/v1/collections/brain/images"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def log_lines():
    """Everything logged during the test, formatted by the JSON formatter, one dict per line."""
    stream = io.StringIO()
    handler = configure_logging("test", ObservabilitySettings(log_format="json"), stream)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    lines: list[dict] = []

    def read() -> list[dict]:
        lines[:] = [json.loads(line) for line in stream.getvalue().splitlines() if line]
        return lines

    yield read
    root.removeHandler(handler)
    root.setLevel(level)


def _gateway(store, dispatcher, search_transport=None) -> TestClient:
    settings = GatewaySettings(token_secret=TOKEN_SECRET.decode())
    transport = search_transport or httpx.MockTransport(lambda r: httpx.Response(503))
    search = httpx.Client(base_url="http://search", transport=transport)
    return TestClient(
        create_gateway(settings, store=store, dispatcher=dispatcher, search_client=search)
    )


def _sample(metrics: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (None if absent)."""
    for line in metrics.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_gateway_counts_requests_by_route_template_and_echoes_request_id(tmp_path, log_lines):
    client = _gateway(FilesystemStore(tmp_path / "s"), RecordingDispatcher())
    route = "/v1/collections/{collection}/images"
    before = _sample(
        client.get("/metrics").text,
        "pecbir_http_requests_total",
        route=route,
        status="202",
        service="gateway",
    )
    image, mask = blob_image()
    rid = "req-test-0001"
    answer = client.post(
        URL, files=upload_files(image, mask), headers={**auth(), REQUEST_ID_HEADER: rid}
    )
    assert answer.status_code == 202
    assert answer.headers[REQUEST_ID_HEADER] == rid
    image_id = answer.json()["image_id"]
    # A request without an id gets a fresh one; a malformed id is replaced, not echoed.
    fresh = client.get("/healthz", headers={REQUEST_ID_HEADER: "bad id\x01"})
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers[REQUEST_ID_HEADER])

    metrics = client.get("/metrics").text
    after = _sample(
        metrics, "pecbir_http_requests_total", route=route, status="202", service="gateway"
    )
    assert after == (before or 0) + 1
    assert _sample(metrics, "pecbir_http_request_duration_seconds_count", route=route) >= 1
    assert image_id not in metrics  # labels carry templates, never ids
    access = [e for e in log_lines() if e["logger"] == "pecbir.access.gateway"]
    assert any(e["request_id"] == rid and e["route"] == route for e in access)
    assert all(image_id not in json.dumps(e) for e in log_lines())


def test_gateway_forwards_request_id_to_search(tmp_path):
    seen: list[str | None] = []

    def search(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get(REQUEST_ID_HEADER))
        return httpx.Response(200, json={"serving_version": None, "n_vectors": 0})

    client = _gateway(
        FilesystemStore(tmp_path / "s"), RecordingDispatcher(), httpx.MockTransport(search)
    )
    answer = client.get(
        "/v1/collections/brain/model", headers={**auth(), REQUEST_ID_HEADER: "req-to-search-1"}
    )
    assert answer.status_code == 200
    assert seen == ["req-to-search-1"]


def test_readiness_fails_when_the_broker_is_unreachable(tmp_path):
    settings = GatewaySettings(
        token_secret=TOKEN_SECRET.decode(), broker_url=f"redis://127.0.0.1:{_closed_port()}/0"
    )
    store = FilesystemStore(tmp_path / "s")
    app = create_gateway(settings, store=store, dispatcher=CeleryDispatcher(settings.broker_url))
    client = TestClient(app)
    answer = client.get("/readyz")
    assert answer.status_code == 503
    checks = answer.json()["checks"]
    assert checks["store"] == "ok" and checks["broker"].startswith("fail")
    assert client.get("/healthz").status_code == 200  # alive, only not ready


def test_readiness_fails_when_the_store_is_unreachable(tmp_path):
    from pecbir_contracts.store import StorageError

    class DeadStore(FilesystemStore):
        def exists(self, key: str) -> bool:
            raise StorageError("connection refused")

    client = _gateway(DeadStore(tmp_path / "s"), RecordingDispatcher())
    answer = client.get("/readyz")
    assert answer.status_code == 503 and "connection refused" in answer.json()["checks"]["store"]
    healthy = _gateway(FilesystemStore(tmp_path / "t"), RecordingDispatcher()).get("/readyz")
    assert healthy.status_code == 200


def test_json_log_lines_carry_request_id_and_no_image_data(log_lines):
    log = logging.getLogger("pecbir.test")
    pixels = bytes(range(256)) * 4
    with request_context("req-logs-0001"):
        log.info("received %s for %s", pixels, "brain", extra={"patient_id": "P-007", "n": 3})
        log.info("array %s", np.zeros((4, 5), np.uint8), extra={"cipher_png": pixels})
        try:
            raise ValueError("bad mask")
        except ValueError:
            log.exception("failed")
    entries = log_lines()
    assert [e["request_id"] for e in entries] == ["req-logs-0001"] * 3
    assert entries[0]["msg"] == "received <1024 bytes> for brain"
    assert entries[0]["n"] == 3 and "patient_id" not in entries[0]
    assert entries[1]["msg"] == "array <array (4, 5) uint8>" and "cipher_png" not in entries[1]
    assert entries[2]["error"] == "ValueError: bad mask" and entries[2]["trace"]
    assert "P-007" not in json.dumps(entries)


def test_formatter_without_context_logs_null_request_id():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %d", (5,), None)
    entry = json.loads(JsonFormatter("svc").format(record))
    assert entry["msg"] == "hello 5" and entry["request_id"] is None and entry["service"] == "svc"


def test_request_id_travels_with_celery_tasks_and_task_metrics_count():
    from celery import Celery
    from celery.contrib.testing.worker import start_worker
    from prometheus_client import REGISTRY

    propagate_request_ids_through_celery()
    app = Celery("obs-test", broker="memory://", backend="cache+memory://")
    app.conf.update(task_default_queue="obs-test")
    seen: dict[str, str | None] = {}

    @app.task(name="obs.record")
    def record(key: str) -> str | None:
        seen[key] = current_request_id()
        return seen[key]

    @app.task(name="obs.fail")
    def fail() -> None:
        raise RuntimeError("boom")

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    runs = value("pecbir_task_duration_seconds_count", task="obs.record", outcome="success")
    fails = value("pecbir_task_failures_total", task="obs.fail", error="RuntimeError")
    with start_worker(app, perform_ping_check=False, pool="solo", loglevel="WARNING"):
        with request_context("req-celery-0001"):
            record.delay("inside").get(timeout=10)
        record.delay("outside").get(timeout=10)
        with pytest.raises(RuntimeError):
            fail.delay().get(timeout=10)
    assert seen["inside"] == "req-celery-0001"
    assert seen["outside"] and seen["outside"] != "req-celery-0001"  # minted per task
    assert (
        value("pecbir_task_duration_seconds_count", task="obs.record", outcome="success")
        == runs + 2
    )
    assert value("pecbir_task_failures_total", task="obs.fail", error="RuntimeError") == fails + 1


def _engine_lines(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["logger"] == "pecbir_search.engine"]


def test_events_carry_the_request_id_to_the_search_follower(tmp_path, log_lines):
    event = VectorEvent(
        tenant="hosp-a", collection="brain", version="v0001", image_id="a" * 32, vector=[0.0]
    )
    with request_context("req-event-0001"):
        wire = encode_event(event)
    assert decode_event(wire).request_id == "req-event-0001"
    assert decode_event(encode_event(event)).request_id is None

    from pecbir_search.engine import SearchEngine

    bus = InMemoryBus()
    engine = SearchEngine(FilesystemStore(tmp_path / "s"), bus)
    engine.start()
    try:
        bus.publish(decode_event(wire))
        # Applied, or refused for lack of the model: either way the follower logs about it.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not _engine_lines(log_lines()):
            time.sleep(0.01)
    finally:
        engine.stop()
    search_lines = _engine_lines(log_lines())
    assert search_lines and all(e["request_id"] == "req-event-0001" for e in search_lines)


def test_search_reports_vectors_held_and_model_version(tmp_path):
    settings = SearchSettings(token_secret=TOKEN_SECRET.decode(), follow=False)
    app = create_search(settings, store=FilesystemStore(tmp_path / "s"), start=False)
    engine = app.state.engine
    state = CollectionState(CollectionLayout("hosp-a", "brain"))
    index = VectorIndex("v0003", 4)
    for i in range(5):
        index.upsert(f"{i:032x}", np.full(4, i, np.float32), None)
    state.serving = Version("v0003", object(), index)
    engine._collections[("hosp-a", "brain")] = state
    client = TestClient(app)
    metrics = client.get("/metrics").text
    assert _sample(metrics, "pecbir_search_vectors", collection="brain", role="serving") == 5
    assert _sample(metrics, "pecbir_model_version", service="search", collection="brain") == 3
    assert _sample(metrics, "pecbir_search_index_bytes") >= 5 * 4 * 4
    ready = client.get("/readyz")
    assert set(ready.json()["checks"]) == {"store", "models"}
    assert ready.json()["checks"]["store"] == "ok"
    # Ready exactly when the code that loads models is there (pecore.pipeline).
    try:
        import pecore.pipeline  # noqa: F401

        loadable = True
    except ImportError:
        loadable = False
    assert (ready.status_code == 200) == loadable


def test_worker_ops_server_serves_metrics_health_and_readiness():
    server = start_ops_server(0, {"ok": lambda: True, "broker": lambda: False}, "127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert httpx.get(base + "/healthz").status_code == 200
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"ok": "ok", "broker": "fail"}
        assert "pecbir_task_duration_seconds" in httpx.get(base + "/metrics").text
        assert httpx.get(base + "/other").status_code == 404
    finally:
        server.shutdown()


def test_indexer_worker_registers_its_probes_and_soft_shutdown(monkeypatch):
    from pecbir_indexer import ops
    from pecbir_indexer.celery import app as celery_app
    from pecbir_indexer.settings import IndexerSettings

    monkeypatch.setenv("PECBIR_SOFT_SHUTDOWN_S", "45")
    ops.instrument(celery_app, IndexerSettings())
    assert celery_app.conf.worker_soft_shutdown_timeout == 45.0
    assert celery_app.conf.worker_prefetch_multiplier == 1
    assert celery_app.conf.task_acks_late and celery_app.conf.task_reject_on_worker_lost
    checks = ops.readiness_checks(IndexerSettings(broker_url=f"redis://127.0.0.1:{_closed_port()}"))
    assert set(checks) == {"broker", "store", "models", "features"}
    assert checks["features"]() is True  # the numpy reference is always there


def test_indexer_reports_its_feature_backend():
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from pecbir_indexer import ops
    from pecbir_indexer.settings import IndexerSettings

    def scrape(settings: IndexerSettings) -> str:
        registry = CollectorRegistry()
        registry.register(ops.FeatureBackendCollector(settings))
        return generate_latest(registry).decode()

    numpy_text = scrape(IndexerSettings())
    assert _sample(numpy_text, "pecbir_feature_backend_info", backend="numpy", device="cpu") == 1
    torch = pytest.importorskip("torch", reason="the [gpu] extra (torch) is not installed")
    on_cpu = IndexerSettings(feature_backend="torch", feature_device="cpu")
    assert _sample(scrape(on_cpu), "pecbir_feature_backend_info", backend="torch", device="cpu")
    assert ops.readiness_checks(on_cpu)["features"]() is True
    if not torch.cuda.is_available():
        no_gpu = IndexerSettings(feature_backend="torch", feature_device="cuda")
        text = scrape(no_gpu)
        assert _sample(text, "pecbir_feature_backend_info", device="unavailable") == 1
        with pytest.raises(ValueError, match="CUDA"):
            ops.readiness_checks(no_gpu)["features"]()


@pytest.mark.integration
def test_queue_depth_and_request_id_header_on_a_real_redis_broker(monkeypatch, tmp_path):
    import shutil

    import redis

    from pecbir_harness.procs import redis_server

    if shutil.which("redis-server") is None:
        pytest.skip("needs the redis-server binary (a private broker, not the shared one)")
    monkeypatch.delenv("PECBIR_TEST_REDIS_URL", raising=False)
    with redis_server(tmp_path) as url:
        client = redis.Redis.from_url(url)
        dispatcher = CeleryDispatcher(url)
        with request_context("req-broker-0001"):
            dispatcher.send(TASK_INDEX_IMAGE, ["hosp-a", "brain", "b" * 32])
        dispatcher.send(TASK_INDEX_IMAGE, ["hosp-a", "brain", "c" * 32])
        collector = QueueDepthCollector(url, [QUEUE_INDEX, QUEUE_TRAIN])
        assert collector.depths() == {QUEUE_INDEX: 2, QUEUE_TRAIN: 0}
        # Kombu LPUSHes and consumers BRPOP: the first message sent is at the tail.
        first, second = (json.loads(client.rpop(QUEUE_INDEX)) for _ in range(2))
        assert first["headers"][REQUEST_ID_FIELD] == "req-broker-0001"
        assert first["headers"]["task"] == TASK_INDEX_IMAGE
        assert REQUEST_ID_FIELD not in second["headers"]  # no request, no id invented
