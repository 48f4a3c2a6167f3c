"""Each service's pyproject extra (what its image installs) covers what its code imports.

The code side is the import closure of the service's package over our own modules, module by
module (the gateway imports no pecore module, so it needs no numba), counting imports at any
depth of a file, lazy ones included. The install side is `pe-cbir[<service>]` as pyproject.toml
declares it, expanded through the installed distributions' own requirements (celery[redis]
brings redis). A fresh venv per extra was tried by hand as well: each service starts from one
and answers /readyz.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pecbir_harness.services import SERVICES

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = [ROOT / "libs" / name for name in ("pecore", "contracts", "platform")] + [
    ROOT / "services" / name for name in SERVICES
]
PROJECT = "pe-cbir"
# Imports that the closure finds but the service never executes (name -> why).
NOT_EXECUTED: dict[str, dict[str, str]] = {
    "indexer": {
        "fastapi": "pecbir_platform.observability.instrument_app: the HTTP apps', not a worker's",
    },
}
# Imports of an optional back end, which an image has only with that extra (name -> why).
OPTIONAL = {
    "torch": "pecore.torch_features: the [gpu] extra's feature back end, chosen by a setting",
}


def _module_file(module: str) -> Path | None:
    for root in SOURCE_ROOTS:
        base = root.joinpath(*module.split("."))
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.exists():
                return candidate
    return None


def _imports(path: Path, module: str) -> list[str]:
    """Every module that `path` imports (at any depth), with `from a import b` as `a` and
    `a.b` (b may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return found


def third_party_imports(package: str) -> set[str]:
    """Top-level names of the third-party modules that `package` can reach."""
    package_dir = _module_file(package).parent
    todo = [package] + [
        ".".join((package, *p.relative_to(package_dir).with_suffix("").parts))
        for p in package_dir.rglob("*.py")
        if p.name != "__init__.py"
    ]
    seen: set[str] = set()
    third: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            continue
        for name in _imports(path, module):
            top = name.split(".")[0]
            parts = name.split(".")
            if _module_file(top) is not None:
                todo += [".".join(parts[: i + 1]) for i in range(len(parts))]
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return third


def installed_by(extra: str) -> set[str]:
    """Canonical names of every distribution that `pip install '.[extra]'` brings."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["optional-dependencies"]
    todo: list[Requirement] = [Requirement(f"{PROJECT}[{extra}]")]
    seen_extras: set[tuple[str, str]] = set()
    found: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name == PROJECT:
            todo += [Requirement(r) for r in project["dependencies"]]
            for wanted in requirement.extras:
                if (name, wanted) not in seen_extras:
                    seen_extras.add((name, wanted))
                    todo += [Requirement(r) for r in declared[wanted]]
            continue
        for wanted in requirement.extras or {""}:
            if (name, wanted) in seen_extras:
                continue
            seen_extras.add((name, wanted))
            found.add(name)
            for raw in importlib.metadata.requires(requirement.name) or []:
                needed = Requirement(raw)
                if needed.marker is None or needed.marker.evaluate({"extra": wanted}):
                    todo.append(needed)
    return found


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_the_extra_of_each_service_installs_what_it_imports(service: str) -> None:
    distributions = importlib.metadata.packages_distributions()
    installed = installed_by(service)
    excused = {**NOT_EXECUTED.get(service, {}), **OPTIONAL}
    missing = {
        name: distributions.get(name)
        for name in sorted(third_party_imports(SERVICES[service].package) - set(excused))
        if not {canonicalize_name(d) for d in distributions.get(name, [])} & installed
    }
    assert not missing, f"[{service}] lacks the distributions of {missing}"


def test_the_gateway_image_has_no_science_and_no_service_image_has_figures() -> None:
    assert not {"numba", "scipy", "scikit-learn"} & installed_by("gateway")
    assert not {"fastapi", "uvicorn"} & installed_by("indexer")
    for service in SERVICES:
        assert not {"matplotlib", "h5py", "tqdm", "scikit-image"} & installed_by(service)


def test_the_closure_sees_lazy_imports_and_skips_unreached_modules() -> None:
    gateway = third_party_imports("pecbir_gateway")
    assert "celery" in gateway  # imported inside CeleryDispatcher.__init__
    assert "numba" not in gateway  # pecore is not reached from the gateway
    assert "numba" in third_party_imports("pecbir_search")
