"""The whole system in one process: encryptor → gateway → indexer → search, no servers.

Embedded mode = filesystem object store + in-process event bus + Celery in eager mode (tasks
run inside the gateway's request, so there is no broker, no redelivery and no parallelism)
+ each FastAPI app reached through an in-process HTTP client. The code paths of the services
are the real ones; only the transports differ from `pecbir serve`.

`background_tasks=True` runs the tasks instead on one worker thread of the process, in the
order they were queued (a Celery worker of concurrency 1, without a broker): the gateway
answers an upload once it is stored, as in a deployment, and indexing overlaps the next
request. Benchmarks of ingest (`pecbir bench-pacs`) use it; tests keep the eager default,
where an upload is indexed when its request returns.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient

from pecbir_contracts import routes
from pecbir_contracts.auth import ENCRYPTOR_TOKEN, GATEWAY_TOKEN, SEARCH_TOKEN, mint_token
from pecbir_harness.services import SERVICES
from pecbir_platform.bus import InMemoryBus
from pecbir_platform.store import FilesystemStore
from pecore.keys import MasterKey

__all__ = [
    "USER_SCOPES",
    "EmbeddedSystem",
    "Hospital",
    "served",
]

USER_SCOPES = ("upload", "search", "read", "train", "decrypt", "key-release")

log = logging.getLogger(__name__)


class BackgroundDispatcher:
    """Runs queued tasks one after the other on a worker thread of this process.

    Parameters
    ----------
    run
        Executes one task by name (`pecbir_indexer.tasks.run_eagerly`).
    """

    def __init__(self, run) -> None:
        self._run = run
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(
            target=self._work, name="pecbir-embedded-worker", daemon=True
        )
        self._thread.start()

    def send(self, task_name: str, args) -> None:
        self._queue.put((task_name, list(args)))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                try:
                    self._run(*item)
                except Exception:  # a task's failure is recorded by the task itself
                    log.exception("embedded task %s failed", item[0])
            finally:
                self._queue.task_done()

    def join(self) -> None:
        """Wait until every task queued so far has run."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)


@dataclass
class Hospital:
    """Another hospital on the same embedded cloud: its own keys, encryptor and users.

    Attributes
    ----------
    tenant
        Its tenant name.
    master
        Its master key.
    user_secret
        HMAC secret of its encryptor's user tokens.
    encryptor_app, encryptor
        Its encryptor and an in-process client of it (signed in as its radiologist).
    """

    tenant: str
    master: MasterKey
    user_secret: bytes
    encryptor_app: object
    encryptor: TestClient

    def user_token(self, scopes=USER_SCOPES, sub: str | None = None) -> str:
        """A user token of this hospital's encryptor."""
        return mint_token(
            self.user_secret.hex().encode(),
            kind=ENCRYPTOR_TOKEN,
            sub=sub or f"radiologist@{self.tenant}",
            tenant=self.tenant,
            scopes=scopes,
            ttl_s=ENCRYPTOR_TOKEN.max_ttl_s,
        )


class EmbeddedSystem:
    def __init__(
        self,
        root: Path,
        *,
        tenant: str = "hospital-a",
        master: MasterKey | None = None,
        encode_threads: int | None = None,
        reindex_chunk: int = 32,
        sealed_collections: frozenset[str] = frozenset(),
        pe_roi_collections: frozenset[str] = frozenset(),
        shared_collections: str = "",
        ui_collections: tuple[str, ...] = ("brain",),
        background_tasks: bool = False,
        template_collections: frozenset[str] = frozenset(),
        viewer_url: str | None = None,
    ) -> None:
        from pecbir_gateway.dispatch import CallableDispatcher
        from pecbir_indexer.runtime import configure_runtime
        from pecbir_indexer.tasks import run_eagerly, use_eager_mode

        # Apps and settings as the table names them; only the transports are in-process.
        encryptor, gateway, indexer, search = (
            SERVICES[name] for name in ("encryptor", "gateway", "indexer", "search")
        )

        self.root = Path(root)
        self.tenant = tenant
        self.master = master or MasterKey.generate()
        self.cloud_secret = secrets.token_bytes(32)
        self.user_secret = secrets.token_bytes(32)
        self.store = FilesystemStore(self.root / "store")
        self.bus = InMemoryBus()
        self._stack = ExitStack()

        use_eager_mode()
        self.dispatcher = (
            BackgroundDispatcher(run_eagerly)
            if background_tasks
            else CallableDispatcher(run_eagerly)
        )
        if background_tasks:
            self._stack.callback(self.dispatcher.close)
        configure_runtime(
            self.store,
            self.bus,
            indexer.load_settings()(encode_threads=encode_threads, reindex_chunk=reindex_chunk),
        )
        cloud = self.cloud_secret.hex()
        self.search_app = search.load()(
            search.load_settings()(token_secret=cloud, encode_threads=encode_threads),
            store=self.store,
            bus=self.bus,
        )
        self.search = self._stack.enter_context(TestClient(self.search_app))
        self.gateway_app = gateway.load()(
            gateway.load_settings()(token_secret=cloud, shared_collections=shared_collections),
            store=self.store,
            dispatcher=self.dispatcher,
            search_client=self.search,
        )
        self.gateway = self._stack.enter_context(TestClient(self.gateway_app))
        gateway_for_encryptor = self._stack.enter_context(TestClient(self.gateway_app))
        self.encryptor_app = encryptor.load()(
            encryptor.load_settings()(
                tenant=tenant,
                master_key=self.root / "unused.key",
                gateway_token=self.cloud_token(),
                user_token_secret=self.user_secret.hex(),
                audit_log=self.root / "encryptor-audit.jsonl",
                sealed_collections=sealed_collections,
                pe_roi_collections=pe_roi_collections,
                patch_models=self.root / "patch-models",
                pending_dir=self.root / "pending",
                content_index=self.root / "content-index",
                dicom_refs_dir=self.root / "dicom-refs",
                viewer_url=viewer_url,
                pacs_credentials=self.root / "pacs-credentials.json",
                ui_collections=ui_collections,
                template_collections=template_collections,
            ),
            master=self.master,
            gateway_client=gateway_for_encryptor,
        )
        self.encryptor = self._stack.enter_context(TestClient(self.encryptor_app))
        self.encryptor.headers["authorization"] = f"Bearer {self.user_token()}"
        self.hospitals: list[Hospital] = []
        self.gateway.headers["authorization"] = f"Bearer {self.cloud_token()}"

    def add_hospital(
        self,
        tenant: str,
        *,
        master: MasterKey | None = None,
        releases_keys: bool = True,
        sealed_collections: frozenset[str] = frozenset(),
        pe_roi_collections: frozenset[str] = frozenset(),
    ) -> Hospital:
        """Another hospital on this cloud, whose encryptor this system's encryptor may ask for
        the keys of its images (with a token of scope key-release, or, with `releases_keys`
        false, one without it: every request is then refused, as an owner that says no)."""
        create_app, settings = SERVICES["encryptor"].load(), SERVICES["encryptor"].load_settings()
        user_secret = secrets.token_bytes(32)
        master = master or MasterKey.generate()
        app = create_app(
            settings(
                tenant=tenant,
                master_key=self.root / "unused.key",
                gateway_token=self.cloud_token(tenant=tenant),
                user_token_secret=user_secret.hex(),
                audit_log=self.root / f"{tenant}-audit.jsonl",
                patch_models=self.root / f"{tenant}-patch-models",
                content_index=self.root / f"{tenant}-content-index",
                dicom_refs_dir=self.root / f"{tenant}-dicom-refs",
                pending_dir=self.root / f"{tenant}-pending",  # not the default, under the cwd
                sealed_collections=sealed_collections,
                pe_roi_collections=pe_roi_collections,
            ),
            master=master,
            gateway_client=self._stack.enter_context(TestClient(self.gateway_app)),
        )
        hospital = Hospital(
            tenant, master, user_secret, app, self._stack.enter_context(TestClient(app))
        )
        hospital.encryptor.headers["authorization"] = f"Bearer {hospital.user_token()}"
        peer = self._stack.enter_context(TestClient(app))
        scopes = ("key-release",) if releases_keys else ("search",)
        peer.headers["authorization"] = (
            f"Bearer {hospital.user_token(scopes, sub=f'peer@{self.tenant}')}"
        )
        self.encryptor_app.state.web.peers.add(tenant, peer)
        # Every hospital of this cloud trusts the others' signed protection records, as each
        # would list the others' public keys in PECBIR_ENCRYPTOR_TRUSTED_OWNERS.
        for other in [self.encryptor_app, *(h.encryptor_app for h in self.hospitals)]:
            trust(other, app)
            trust(app, other)
        self.hospitals.append(hospital)
        return hospital

    def cloud_token(self, scopes=("upload", "search", "read", "train"), tenant=None) -> str:
        tenant = tenant or self.tenant
        return mint_token(
            self.cloud_secret.hex().encode(),
            kind=GATEWAY_TOKEN,
            sub=f"encryptor@{tenant}",
            tenant=tenant,
            scopes=scopes,
            ttl_s=24 * 3600,
        )

    def search_token(self) -> str:
        """A token for calling the search service directly (as the gateway does; 60 s)."""
        return mint_token(
            self.cloud_secret.hex().encode(),
            kind=SEARCH_TOKEN,
            sub=f"operator@{self.tenant}",
            tenant=self.tenant,
            scopes=("search", "read"),
            ttl_s=60,
        )

    def user_token(self, scopes=USER_SCOPES) -> str:
        return mint_token(
            self.user_secret.hex().encode(),
            kind=ENCRYPTOR_TOKEN,
            sub=f"radiologist@{self.tenant}",
            tenant=self.tenant,
            scopes=scopes,
            ttl_s=ENCRYPTOR_TOKEN.max_ttl_s,
        )

    @property
    def engine(self):  # pecbir_search.engine.SearchEngine
        return self.search_app.state.engine

    def wait_searchable(self, collection: str, n: int, timeout: float = 60.0) -> dict:
        """Block until the search service serves `n` vectors of the newest version."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.gateway.get(routes.GATEWAY_MODEL.format(collection=collection)).json()
            if (
                status["serving_version"]
                and status["serving_version"] == status["indexing_version"]
                and status["n_vectors"] >= n
            ):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"search holds {status} after {timeout} s, expected {n}")
            time.sleep(0.02)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> EmbeddedSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def trust(truster, owner) -> None:
    """Make the encryptor app `truster` hold the public key of the encryptor app `owner`."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    signing = owner.state.encryptor.signing_key
    raw = signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    truster.state.encryptor.trusted_owners[owner.state.encryptor.tenant] = base64.b64encode(
        raw
    ).decode()


@contextlib.contextmanager
def served(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve an ASGI `app` (e.g. an `EmbeddedSystem`'s encryptor) over real HTTP from a
    thread of this process until the block ends; its base URL (for a real PACS to push to).

    Parameters
    ----------
    app
        The ASGI application.
    host
        Address to listen on (loopback).
    """
    import threading

    import uvicorn

    from pecbir_harness.procs import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
