"""The docstring examples of pecore's retrieval API run and print what they show.

They use small synthetic arrays (no dataset) and print shapes, dtypes, integers or coarsely
rounded values, so they pass on any CPU.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "pecore",
    "pecore.roi",
    "pecore.features",
    "pecore.fisher",
    "pecore.metric",
    "pecore.pipeline",
    "pecore.evaluate",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_pass(module_name: str) -> None:
    module = importlib.import_module(module_name)
    # report=False: the failures themselves are printed (pytest shows them with the failure)
    results = doctest.testmod(module, report=False)
    assert results.attempted > 0, f"{module_name} has no docstring examples"
    assert results.failed == 0, f"{results.failed} docstring example(s) of {module_name} failed"
