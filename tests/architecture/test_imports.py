"""The import arrows of the house, checked on the source (AST), not by convention.

pecore (science) ← contracts (definitions) ← platform (back ends) ← services; the CLI and
the harness sit on top. A service never imports another service, the CLI or the harness.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PACKAGES = {
    "pecore": ROOT / "libs/pecore/pecore",
    "pecbir_contracts": ROOT / "libs/contracts/pecbir_contracts",
    "pecbir_platform": ROOT / "libs/platform/pecbir_platform",
    "pecbir_harness": ROOT / "libs/harness/pecbir_harness",
    "pecbir": ROOT / "libs/cli/pecbir",
    "pecbir_encryptor": ROOT / "services/encryptor/pecbir_encryptor",
    "pecbir_gateway": ROOT / "services/gateway/pecbir_gateway",
    "pecbir_indexer": ROOT / "services/indexer/pecbir_indexer",
    "pecbir_search": ROOT / "services/search/pecbir_search",
}
SERVICES = ("pecbir_encryptor", "pecbir_gateway", "pecbir_indexer", "pecbir_search")
WEB = ("fastapi", "starlette", "uvicorn", "celery", "kombu", "httpx", "redis", "minio")

# package -> top-level modules it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "pecore": (*PACKAGES.keys() - {"pecore"}, *WEB),
    "pecbir_contracts": (*PACKAGES.keys() - {"pecbir_contracts"}, "celery", "redis", "minio"),
    "pecbir_platform": (*SERVICES, "pecbir", "pecbir_harness", "pecore"),
    **{
        service: (*(s for s in SERVICES if s != service), "pecbir", "pecbir_harness")
        for service in SERVICES
    },
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module that `path` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package: str) -> None:
    offences = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted(PACKAGES[package].rglob("*.py"))
        for name in sorted(imported_modules(path) & set(FORBIDDEN[package]))
    ]
    assert not offences, "\n".join(offences)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pecbir_gateway.app import create_app\n    import celery\n")
    assert imported_modules(bad) == {"pecbir_gateway", "celery"}


def test_every_package_is_listed() -> None:
    found = {p.parent.name for p in ROOT.glob("libs/*/*/__init__.py")}
    found |= {p.parent.name for p in ROOT.glob("services/*/*/__init__.py")}
    assert found == set(PACKAGES)
