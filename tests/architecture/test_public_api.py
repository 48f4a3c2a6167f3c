"""Every module of the libraries says what it offers (`__all__`), and offers what it says."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = ("pecore", "pecbir_contracts", "pecbir_platform", "pecbir_harness")


def library_modules() -> list[str]:
    modules = []
    for package in LIBRARIES:
        (folder,) = ROOT.glob(f"libs/*/{package}")
        modules += [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py"))]
    return [m for m in modules if not m.endswith(".__init__")]


@pytest.mark.parametrize("name", library_modules())
def test_module_declares_a_public_api_that_exists(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
