"""Real processes for integration tests and benchmarks: Redis, moto S3, uvicorn, Celery.

Every process is started in its own process group and killed (group-wide) on teardown.
"""

from __future__ import annotations

import contextlib
import json
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

from pecbir_harness.services import SERVICES

__all__ = [
    "BIN",
    "Cluster",
    "RedisProcess",
    "Started",
    "TcpProxy",
    "celery_worker",
    "free_port",
    "moto_s3",
    "port_open",
    "process",
    "redis_server",
    "service_app",
    "stop",
    "wait_for",
]

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


Started = Callable[[subprocess.Popen], None] | None


@contextlib.contextmanager
def process(
    args: list[str],
    what: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    on_start: Started = None,
) -> Iterator[subprocess.Popen]:
    """`on_start(proc)` is called once the process exists (to watch it: pid, memory)."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if on_start is not None:
        on_start(proc)
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
    """A private redis-server on a free loopback port (data under `tmp`, nothing saved), or
    the external Redis named by $PECBIR_TEST_REDIS_URL when that is set. An external Redis is
    used as it is and never flushed: a test run must not delete data it did not create, so
    the tests that share it write only under keys they made."""
    import redis

    external = os.environ.get("PECBIR_TEST_REDIS_URL")
    if external:
        redis.Redis.from_url(external, socket_timeout=2).ping()
        yield external
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "no redis-server binary (install Debian's redis-server, or set "
            "PECBIR_TEST_REDIS_URL to a Redis the tests may use)"
        )
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(tmp)]
    with process(args, "redis-server") as proc:
        wait_for(lambda: redis.Redis(host="127.0.0.1", port=port).ping(), "redis-server", proc=proc)
        yield f"redis://127.0.0.1:{port}/0"


class RedisProcess:
    """A private redis-server on a free loopback port that a test may kill and start again.

    Append-only file with fsync on every write: what Redis acknowledged survives a kill -9,
    as a broker behind "acknowledged only when durable" must (deploy Redis the same way).
    """

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server binary")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder)]
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        wait_for(
            lambda: redis.Redis(host="127.0.0.1", port=self.port).ping(),
            "redis-server",
            proc=self.proc,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the AOF already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


class TcpProxy:
    """A loopback TCP forwarder; `stop()` cuts every connection (a network partition)."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        import threading

        self.target_port = target_port
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def start(self) -> TcpProxy:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@contextlib.contextmanager
def moto_s3(log: Path | None = None, on_start: Started = None) -> Iterator[str]:
    """moto's standalone S3 server over HTTP (tests the S3 wire path, not S3 security)."""
    port = free_port()
    args = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with process(args, "moto_server", log=log, on_start=on_start) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/moto-api/").status_code < 500, "moto_server", proc=proc)
        yield url


@contextlib.contextmanager
def service_app(
    name: str,
    env: dict[str, str],
    log: Path | None = None,
    timeout: float = 60.0,
    port: int | None = None,
    on_start: Started = None,
) -> Iterator[str]:
    """The HTTP service `name` of the table under uvicorn on loopback (a free port unless
    `port`); yields its base URL once its health path answers."""
    spec = SERVICES[name]
    port = port or free_port()
    args = [*spec.command(host="127.0.0.1", port=port, bin_dir=BIN), "--log-level", "warning"]
    with process(args, spec.entry, env=env, log=log, on_start=on_start) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: httpx.get(url + spec.health_path).status_code == 200, spec.entry, timeout, proc
        )
        yield url


@contextlib.contextmanager
def celery_worker(env: dict[str, str], log: Path | None = None) -> Iterator[subprocess.Popen]:
    """One solo-pool indexer worker on every queue of the table's indexer."""
    args = SERVICES["indexer"].command(bin_dir=BIN)
    args += ["--pool", "solo", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    args += ["--without-heartbeat", "-n", f"test-{os.getpid()}-{free_port()}@localhost"]
    with process(args, "celery worker", env=env, log=log) as proc:
        yield proc


class Cluster:
    """Redis + moto S3 + Celery worker + uvicorn search, gateway (and encryptor), on loopback."""

    def __init__(
        self,
        tmp: Path,
        *,
        tenant: str = "hospital-a",
        encryptor: bool = True,
        own_redis: bool = False,
        store_proxy: bool = False,
        extra_env: dict[str, str] | None = None,
        sealed_collections: tuple[str, ...] = (),
    ) -> None:
        import secrets

        self.own_redis = own_redis
        self.use_store_proxy = store_proxy
        self.extra_env = extra_env or {}
        self.redis: RedisProcess | None = None
        self.store_proxy: TcpProxy | None = None
        self._worker_cm: contextlib.AbstractContextManager | None = None
        self.tmp = Path(tmp)
        self.tenant = tenant
        self.with_encryptor = encryptor
        self.sealed_collections = sealed_collections
        self.cloud_secret = secrets.token_hex(32)
        self.user_secret = secrets.token_hex(32)
        self.logs = self.tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self._search_cm: contextlib.AbstractContextManager | None = None
        # The processes this cluster started, by role (restarts replace the entry).
        self.processes: dict[str, subprocess.Popen] = {}

    def _track(self, role: str) -> Callable[[subprocess.Popen], None]:
        return lambda proc: self.processes.__setitem__(role, proc)

    def token(self, scopes=("upload", "search", "read", "train"), tenant: str | None = None) -> str:
        from pecbir_contracts.auth import GATEWAY_TOKEN, mint_token

        return mint_token(
            self.cloud_secret.encode(),
            kind=GATEWAY_TOKEN,
            sub="operator",
            tenant=tenant or self.tenant,
            scopes=scopes,
            ttl_s=6 * 3600,
        )

    def search_token(self, tenant: str | None = None) -> str:
        """A token for calling the search service directly (as the gateway does; 60 s)."""
        from pecbir_contracts.auth import SEARCH_TOKEN, mint_token

        return mint_token(
            self.cloud_secret.encode(),
            kind=SEARCH_TOKEN,
            sub="operator",
            tenant=tenant or self.tenant,
            scopes=("search", "read"),
            ttl_s=60,
        )

    def user_token(self, scopes=("upload", "search", "decrypt", "key-release")) -> str:
        from pecbir_contracts.auth import ENCRYPTOR_TOKEN, mint_token

        return mint_token(
            self.user_secret.encode(),
            kind=ENCRYPTOR_TOKEN,
            sub="radiologist",
            tenant=self.tenant,
            scopes=scopes,
        )

    def start(self) -> Cluster:
        stack = self._stack
        if self.own_redis:
            self.redis = RedisProcess(self.tmp / "redis").start()
            stack.callback(self.redis.stop)
            self.redis_url = self.redis.url
        else:
            self.redis_url = stack.enter_context(redis_server(self.tmp))
        self.s3_url = stack.enter_context(moto_s3(self.logs / "moto.log", self._track("moto")))
        self.moto_url = self.s3_url
        if self.use_store_proxy:
            moto_port = int(self.s3_url.rsplit(":", 1)[1])
            self.store_proxy = TcpProxy(moto_port).start()
            stack.callback(self.store_proxy.stop)
            self.s3_url = self.store_proxy.url
        self.env = {
            "PECBIR_STORE_URL": self.s3_url,
            "PECBIR_S3_ACCESS_KEY": "test-access",
            "PECBIR_S3_SECRET_KEY": "test-secret",
            "PECBIR_S3_BUCKET": "pecbir",
            "PECBIR_BROKER_URL": self.redis_url,
            "PECBIR_TOKEN_SECRET": self.cloud_secret,
            "PECBIR_REINDEX_CHUNK": "16",
            # Budgets in Redis, as deployed; set wide (callers' extra_env narrows them): the
            # cluster serves soak and benchmark loads, which measure capacity, not the limits.
            "PECBIR_RATE_LIMITS_URL": self.redis_url,
            "PECBIR_RATE_LIMITS": "search=1000/10000,upload=1000/10000,train=1000/10000",
            # One BLAS thread per request/task: concurrent requests already use the cores.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            **self.extra_env,
        }
        self.start_worker()
        self.start_search()
        self.env["PECBIR_SEARCH_URL"] = self.search_url
        self.gateway_url = stack.enter_context(
            service_app(
                "gateway",
                self.env,
                self.logs / "gateway.log",
                on_start=self._track("gateway"),
            )
        )
        if self.with_encryptor:
            from pecore.keys import MasterKey

            key_path = self.tmp / "master.key"
            if not key_path.exists():
                MasterKey.generate().save(key_path)
            encryptor = SERVICES["encryptor"]
            encryptor_env = {
                encryptor.env_name(field): value
                for field, value in {
                    "tenant": self.tenant,
                    "master_key": str(key_path),
                    "gateway_url": self.gateway_url,
                    "gateway_token": self.token(),
                    "user_token_secret": self.user_secret,
                    "audit_log": str(self.tmp / "audit.jsonl"),
                    "sealed_collections": json.dumps(list(self.sealed_collections)),
                    "patch_models": str(self.tmp / "patch-models"),
                }.items()
            }
            self.encryptor_url = stack.enter_context(
                service_app(
                    "encryptor",
                    encryptor_env,
                    self.logs / "encryptor.log",
                    on_start=self._track("encryptor"),
                )
            )
        return self

    def service_pids(self) -> dict[str, int]:
        """Pid of every live process this cluster started, by role (own Redis included)."""
        procs = dict(self.processes)
        if self.redis is not None and self.redis.proc is not None:
            procs["redis"] = self.redis.proc
        return {role: proc.pid for role, proc in procs.items() if proc.poll() is None}

    def start_worker(self) -> subprocess.Popen:
        self._worker_cm = celery_worker(self.env, self.logs / "worker.log")
        self.worker = self._worker_cm.__enter__()
        self.processes["worker"] = self.worker
        return self.worker

    def kill_worker(self) -> None:
        """SIGKILL the worker's whole process group (no shutdown, no ack)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(10)
        if self._worker_cm is not None:
            self._worker_cm.__exit__(None, None, None)
            self._worker_cm = None

    def stop_worker(self) -> None:
        if self._worker_cm is not None:
            self._worker_cm.__exit__(None, None, None)
            self._worker_cm = None

    def start_search(self) -> None:
        self._search_port = getattr(self, "_search_port", None) or free_port()
        self._search_cm = service_app(
            "search",
            self.env,
            self.logs / "search.log",
            port=self._search_port,
            on_start=self._track("search"),
        )
        self.search_url = self._search_cm.__enter__()
        self.env["PECBIR_SEARCH_URL"] = self.search_url

    def stop_search(self) -> None:
        if self._search_cm is not None:
            self._search_cm.__exit__(None, None, None)
            self._search_cm = None

    def close(self) -> None:
        self.stop_search()
        self.stop_worker()
        self._stack.close()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
