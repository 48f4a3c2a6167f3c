"""Real processes for integration tests and benchmarks: Redis, Ceph radosgw, uvicorn, Celery.

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
from dataclasses import dataclass
from pathlib import Path

import httpx

from pecbir_contracts.store import ObjectStore
from pecbir_harness.radosgw import RadosGateway
from pecbir_harness.services import SERVICES

__all__ = [
    "BIN",
    "Cluster",
    "RedisProcess",
    "S3Bucket",
    "Started",
    "celery_worker",
    "free_port",
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


@dataclass(frozen=True)
class S3Bucket:
    """One bucket of an S3 server (radosgw): what the cloud services' store settings hold."""

    url: str
    access_key: str
    secret_key: str
    bucket: str
    #: The radosgw serving it, when this process manages one (to stop and restart it).
    gateway: RadosGateway | None = None
    #: base64 of the 32-byte SSE-C key every object is written with; empty: none.
    sse_c_key: str = ""

    @classmethod
    def on(cls, gateway: RadosGateway, bucket: str, *, sse_c: bool = False) -> S3Bucket:
        """Bucket `bucket` of `gateway`; `sse_c`: with a fresh random SSE-C key."""
        import base64
        import secrets

        state = gateway.state
        key = base64.b64encode(secrets.token_bytes(32)).decode() if sse_c else ""
        return cls(gateway.endpoint, state.access_key, state.secret_key, bucket, gateway, key)

    def env(self) -> dict[str, str]:
        return {
            "PECBIR_STORE_URL": self.url,
            "PECBIR_S3_ACCESS_KEY": self.access_key,
            "PECBIR_S3_SECRET_KEY": self.secret_key,
            "PECBIR_S3_BUCKET": self.bucket,
            "PECBIR_S3_SSE_C_KEY": self.sse_c_key,
        }

    def open(self) -> ObjectStore:
        """The bucket as the services open it (a MinioStore; the store extra, imported here)."""
        from pecbir_platform.store import StoreSettings

        env = self.env()
        return StoreSettings(
            **{name[len("PECBIR_") :].lower(): env[name] for name in env}
        ).open_store()


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
    """Redis + radosgw S3 + Celery worker + uvicorn search, gateway (and encryptor), on loopback.

    `s3`: a bucket of a radosgw already running (the tests share one); None starts a private
    radosgw under `tmp` for this cluster.
    """

    def __init__(
        self,
        tmp: Path,
        *,
        tenant: str = "hospital-a",
        encryptor: bool = True,
        own_redis: bool = False,
        s3: S3Bucket | None = None,
        extra_env: dict[str, str] | None = None,
        sealed_collections: tuple[str, ...] = (),
        template_collections: tuple[str, ...] = (),
        workers: int = 1,
        start_timeout_s: float = 60.0,
    ) -> None:
        import secrets

        self.own_redis = own_redis
        self.s3 = s3
        self.extra_env = extra_env or {}
        self.redis: RedisProcess | None = None
        self.n_workers = workers
        # How long a (re)started HTTP service may take to answer its health path: the search
        # service loads every collection from the store first (minutes on a loaded machine).
        self.start_timeout_s = start_timeout_s
        # Worker i's context manager (None while it is stopped); worker 0 logs to worker.log.
        self._worker_cms: dict[int, contextlib.AbstractContextManager] = {}
        self.workers: dict[int, subprocess.Popen] = {}
        self.tmp = Path(tmp)
        self.tenant = tenant
        self.with_encryptor = encryptor
        self.sealed_collections = sealed_collections
        self.template_collections = template_collections
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
        if self.s3 is None:
            gateway = RadosGateway(self.tmp / "radosgw")
            stack.callback(gateway.stop)
            self.s3 = S3Bucket.on(gateway.start(), "pecbir")
        self.env = {
            **self.s3.env(),
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
        for index in range(self.n_workers):
            self.start_worker(index)
        self.start_search()
        self.env["PECBIR_SEARCH_URL"] = self.search_url
        self.start_gateway()
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
                    "template_collections": json.dumps(list(self.template_collections)),
                    "patch_models": str(self.tmp / "patch-models"),
                    "pending_dir": str(self.tmp / "pending"),
                    "content_index": str(self.tmp / "content-index"),
                    "dicom_refs_dir": str(self.tmp / "dicom-refs"),
                    "pacs_credentials": str(self.tmp / "pacs-credentials.json"),
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
        """Pid of every live process this cluster uses, by role (own Redis and the radosgw
        daemons included: `radosgw`, `ceph-osd` (memstore: it holds the objects), `ceph-mon`)."""
        procs = dict(self.processes)
        if self.redis is not None and self.redis.proc is not None:
            procs["redis"] = self.redis.proc
        pids = {role: proc.pid for role, proc in procs.items() if proc.poll() is None}
        if self.s3 is not None and self.s3.gateway is not None:
            pids.update(self.s3.gateway.pids())
        return pids

    def worker_log(self, index: int = 0) -> Path:
        """The log file of worker `index` (worker 0: worker.log, as with one worker)."""
        return self.logs / ("worker.log" if index == 0 else f"worker-{index}.log")

    def start_worker(self, index: int = 0) -> subprocess.Popen:
        """Start worker `index` (0 to `workers` - 1); `self.worker` is worker 0."""
        cm = celery_worker(self.env, self.worker_log(index))
        proc = cm.__enter__()
        self._worker_cms[index] = cm
        self.workers[index] = proc
        self.processes["worker" if index == 0 else f"worker-{index}"] = proc
        if index == 0:
            self.worker = proc
        return proc

    def kill_worker(self, index: int = 0) -> None:
        """SIGKILL worker `index`'s whole process group (no shutdown, no ack)."""
        proc = self.workers.get(index)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        cm = self._worker_cms.pop(index, None)
        if cm is not None:
            cm.__exit__(None, None, None)

    def stop_worker(self) -> None:
        """Stop every worker (SIGTERM)."""
        for index in list(self._worker_cms):
            self._worker_cms.pop(index).__exit__(None, None, None)

    def start_gateway(self) -> None:
        """Start the gateway (again, on the same port after a stop or kill)."""
        self._gateway_port = getattr(self, "_gateway_port", None) or free_port()
        self._gateway_cm = service_app(
            "gateway",
            self.env,
            self.logs / "gateway.log",
            timeout=self.start_timeout_s,
            port=self._gateway_port,
            on_start=self._track("gateway"),
        )
        self.gateway_url = self._gateway_cm.__enter__()

    def kill_service(self, name: str) -> None:
        """SIGKILL the gateway or the search service (no shutdown); start_<name> restarts it."""
        cm = getattr(self, f"_{name}_cm", None)
        setattr(self, f"_{name}_cm", None)
        proc = self.processes.get(name)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if cm is not None:
            cm.__exit__(None, None, None)

    def start_search(self) -> None:
        self._search_port = getattr(self, "_search_port", None) or free_port()
        self._search_cm = service_app(
            "search",
            self.env,
            self.logs / "search.log",
            timeout=self.start_timeout_s,
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
        if getattr(self, "_gateway_cm", None) is not None:
            self._gateway_cm.__exit__(None, None, None)
            self._gateway_cm = None
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
