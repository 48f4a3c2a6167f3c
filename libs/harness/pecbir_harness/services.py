"""The table of services: the one place that says how each service is started.

`pecbir serve`, the test cluster (`procs.Cluster`) and the embedded demo
(`embedded.EmbeddedSystem`) read it instead of spelling the services out, and tests/deploy checks
it against deploy/k8s and deploy/Dockerfile (ports, app paths, queues, probes). Importing this
module imports no service: entries are "module:attribute" strings, loaded on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pecbir_contracts.tasks import WORKER_QUEUES

__all__ = ["SERVICES", "ServiceSpec", "cloud_services", "load_attribute"]

ServiceKind = Literal["http", "worker"]
Side = Literal["cloud", "hospital"]


def load_attribute(path: str) -> Any:
    """Import `"package.module:attribute"` and return the attribute.

    Parameters
    ----------
    path
        A module path and an attribute name, separated by a colon (uvicorn's and Celery's
        notation).

    Returns
    -------
    object
        The attribute of the imported module.
    """
    module_name, _, attribute = path.partition(":")
    if not attribute:
        raise ValueError(f"{path!r} is not 'module:attribute'")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """How one service is started.

    Attributes
    ----------
    name
        The service's name: its package is `pecbir_<name>`, its image `pecbir/<name>`, its
        pyproject extra `[<name>]`.
    kind
        "http": a FastAPI app that uvicorn builds from a factory; "worker": a Celery worker.
    entry
        "module:attribute" of the app factory (http) or of the Celery app (worker).
    settings
        "module:Class" of the service's own pydantic settings.
    port
        The port it listens on by default: HTTP for an app, the ops server (PECBIR_OPS_PORT,
        /healthz, /readyz, /metrics) for a worker.
    env_prefix
        Prefix of the environment variables its settings read.
    side
        Where it runs: in the cloud, or at the hospital (the owner-side encryptor).
    queues
        The queues a worker consumes (all of them, when one worker does everything; deploy/k8s
        splits them over several deployments). Empty for an app.
    health_path
        Liveness: answers 200 as long as the process runs.
    ready_path
        Readiness: answers 200 once the service's dependencies are reachable.
    """

    name: str
    kind: ServiceKind
    entry: str
    settings: str
    port: int
    env_prefix: str
    side: Side
    queues: tuple[str, ...] = ()
    health_path: str = "/healthz"
    ready_path: str = "/readyz"

    @property
    def image(self) -> str:
        """The image repository, without registry or tag."""
        return f"pecbir/{self.name}"

    @property
    def package(self) -> str:
        """The service's Python package."""
        return f"pecbir_{self.name}"

    def env_name(self, field: str) -> str:
        """The environment variable that sets the settings field `field`."""
        return f"{self.env_prefix}{field}".upper()

    def load(self) -> Any:
        """The app factory or the Celery app (imports the service)."""
        return load_attribute(self.entry)

    def load_settings(self) -> type:
        """The service's settings class (imports the service)."""
        return load_attribute(self.settings)

    def command(
        self, *, host: str = "127.0.0.1", port: int | None = None, bin_dir: Path | None = None
    ) -> list[str]:
        """The command line that starts the service; callers append their own options.

        Parameters
        ----------
        host
            Interface an app binds to (ignored for a worker).
        port
            Port an app listens on; `self.port` when None (ignored for a worker, whose ops
            port comes from PECBIR_OPS_PORT).
        bin_dir
            Folder of the `uvicorn`/`celery` executables; None: as found on the PATH.

        Returns
        -------
        list of str
            `uvicorn --factory <entry> --host H --port P` or `celery -A <entry> worker -Q <queues>`.
        """
        program = "uvicorn" if self.kind == "http" else "celery"
        executable = str(bin_dir / program) if bin_dir is not None else program
        if self.kind == "http":
            return [
                executable,
                "--factory",
                self.entry,
                "--host",
                host,
                "--port",
                str(self.port if port is None else port),
            ]
        return [executable, "-A", self.entry, "worker", "-Q", ",".join(self.queues)]


# In the order `pecbir serve` starts them: a service's peers before it.
SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec(
            name="search",
            kind="http",
            entry="pecbir_search.app:create_app",
            settings="pecbir_search.settings:SearchSettings",
            port=8002,
            env_prefix="PECBIR_",
            side="cloud",
        ),
        ServiceSpec(
            name="gateway",
            kind="http",
            entry="pecbir_gateway.app:create_app",
            settings="pecbir_gateway.settings:GatewaySettings",
            port=8001,
            env_prefix="PECBIR_",
            side="cloud",
        ),
        ServiceSpec(
            name="indexer",
            kind="worker",
            entry="pecbir_indexer.celery:app",
            settings="pecbir_indexer.settings:IndexerSettings",
            port=9100,
            env_prefix="PECBIR_",
            side="cloud",
            queues=WORKER_QUEUES,
        ),
        ServiceSpec(
            name="encryptor",
            kind="http",
            entry="pecbir_encryptor.app:create_app",
            settings="pecbir_encryptor.settings:EncryptorSettings",
            port=8003,
            env_prefix="PECBIR_ENCRYPTOR_",
            side="hospital",
        ),
    )
}


def cloud_services() -> list[ServiceSpec]:
    """The services that run in the cloud, in start order."""
    return [spec for spec in SERVICES.values() if spec.side == "cloud"]
