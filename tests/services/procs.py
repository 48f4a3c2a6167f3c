"""Real processes for integration tests: Redis, moto S3, uvicorn, Celery. Loopback only.

Every process is started in its own process group and killed (group-wide) on teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with code {proc.returncode}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout} s")


@contextlib.contextmanager
def process(
    args: list[str], what: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop(proc)
        if log:
            out.close()


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """The machine's Redis on 127.0.0.1:6379 if it answers, else a private redis-server."""
    import redis

    if os.environ.get("PECBIR_TEST_OWN_REDIS") != "1":
        with contextlib.suppress(Exception):
            if redis.Redis(host="127.0.0.1", port=6379, socket_timeout=0.5).ping():
                yield "redis://127.0.0.1:6379/0"
                return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no Redis on 127.0.0.1:6379 and no redis-server binary")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(tmp)]
    with process(args, "redis-server") as proc:
        wait_for(lambda: redis.Redis(host="127.0.0.1", port=port).ping(), "redis-server", proc=proc)
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def moto_s3(log: Path | None = None) -> Iterator[str]:
    """moto's standalone S3 server over HTTP (tests the S3 wire path, not S3 security)."""
    port = free_port()
    args = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with process(args, "moto_server", log=log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/moto-api/").status_code < 500, "moto_server", proc=proc)
        yield url


@contextlib.contextmanager
def uvicorn_app(
    factory: str, env: dict[str, str], log: Path | None = None, timeout: float = 60.0
) -> Iterator[str]:
    port = free_port()
    args = [str(BIN / "uvicorn"), "--factory", factory, "--host", "127.0.0.1", "--port", str(port)]
    args += ["--log-level", "warning"]
    with process(args, factory, env=env, log=log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, factory, timeout, proc)
        yield url


@contextlib.contextmanager
def celery_worker(env: dict[str, str], log: Path | None = None) -> Iterator[subprocess.Popen]:
    args = [str(BIN / "celery"), "-A", "pecbir_indexer.app:celery_app", "worker"]
    args += ["--pool", "solo", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    args += ["--without-heartbeat", "-n", f"test-{os.getpid()}-{free_port()}@localhost"]
    with process(args, "celery worker", env=env, log=log) as proc:
        yield proc
