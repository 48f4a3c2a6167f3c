"""pecore's retrieval modules keep a clean public API: a complete `__all__`, re-exported lazily
by the package, numpydoc docstrings on every public name, and scikit-learn estimators whose
parameters are keyword-only and stored unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone

import pecore
from pecore.features import PatchPCA
from pecore.fisher import DiagonalGMM, FisherVectorEncoder
from pecore.metric import CFML
from pecore.pipeline import CBIRPipeline

RETRIEVAL_MODULES = [
    "pecore.roi",
    "pecore.features",
    "pecore.fisher",
    "pecore.metric",
    "pecore.pipeline",
    "pecore.evaluate",
]
ESTIMATORS = [PatchPCA, DiagonalGMM, FisherVectorEncoder, CFML, CBIRPipeline]


def _defined_public_names(module: object) -> set[str]:
    """Public functions and classes defined in (not imported into) `module`."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__  # type: ignore[attr-defined]
    }


def _section(doc: str, title: str) -> str | None:
    """The body of one numpydoc section (up to the next underlined heading), if present."""
    match = re.search(rf"^{title}\n-+\n(.*?)(?=^\S[^\n]*\n-+\n|\Z)", doc, re.M | re.S)
    return match.group(1) if match else None


def _documented_names(body: str) -> set[str]:
    """Names of the "name : type" entries of a section ("a, b : type" and "**params" too)."""
    names: set[str] = set()
    for line in body.splitlines():
        entry = re.match(r"^([\w, *]+?)(?: :|$)", line)
        if entry and not line.startswith(" "):
            names |= {name.strip().lstrip("*") for name in entry.group(1).split(",")}
    return names


def _public_objects() -> list[pytest.ParameterSet]:
    """Every name in the retrieval modules' `__all__`, and the public methods of its classes."""
    found = []
    for module_name in RETRIEVAL_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            found.append(pytest.param(value, id=f"{module_name}.{name}"))
            if inspect.isclass(value):
                for attr, member in vars(value).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    if inspect.isfunction(member) or isinstance(member, property):
                        found.append(pytest.param(member, id=f"{module_name}.{name}.{attr}"))
    return found


@pytest.mark.parametrize("module_name", RETRIEVAL_MODULES)
def test_all_lists_exactly_the_public_functions_and_classes(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == module.__all__, "keep __all__ sorted"
    assert set(module.__all__) == _defined_public_names(module)


def test_the_package_reexports_every_module_api_lazily() -> None:
    exported = {
        name: module for module, names in pecore._EXPORTS_BY_MODULE.items() for name in names
    }
    assert set(pecore._EXPORTS_BY_MODULE) == set(RETRIEVAL_MODULES)
    for module_name in RETRIEVAL_MODULES:
        module = importlib.import_module(module_name)
        assert set(pecore._EXPORTS_BY_MODULE[module_name]) == set(module.__all__)
    assert sorted(pecore.__all__) == sorted(exported)
    for name, module_name in exported.items():
        assert getattr(pecore, name) is getattr(importlib.import_module(module_name), name)
        assert name in dir(pecore)
    with pytest.raises(AttributeError):
        pecore.no_such_name  # noqa: B018


def test_import_pecore_loads_no_numerical_library() -> None:
    heavy = "{'numpy', 'scipy', 'numba', 'sklearn'}"
    code = f"import sys, pecore; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("obj", _public_objects())
def test_public_names_have_numpydoc_docstrings(obj: object) -> None:
    doc = inspect.getdoc(obj)
    assert doc, "no docstring"
    if isinstance(obj, property) or (inspect.isclass(obj) and obj.__init__ is object.__init__):
        return  # a summary line is the numpydoc form of a property or a plain record
    parameters = [
        p.name for p in inspect.signature(obj).parameters.values() if p.name not in ("self", "cls")
    ]
    # a dataclass documents its fields as Attributes; everything else has Parameters
    sections = ("Attributes",) if dataclasses.is_dataclass(obj) else ("Parameters",)
    documented: set[str] = set()
    for title in sections:
        body = _section(doc, title)
        documented |= _documented_names(body) if body is not None else set()
    assert set(parameters) <= documented, f"undocumented {set(parameters) - documented}"
    if inspect.isfunction(obj) and inspect.signature(obj).return_annotation not in ("None",):
        assert _section(doc, "Returns") is not None, "no Returns section"


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda c: c.__name__)
def test_estimators_document_fitted_attributes_and_show_an_example(estimator: type) -> None:
    doc = inspect.getdoc(estimator)
    assert doc is not None
    assert re.search(r"^Examples\n-+\n>>> ", doc, re.M), "one doctest per estimator"
    if estimator is not FisherVectorEncoder:  # nothing is learned there: no fitted attributes
        attributes = _section(doc, "Attributes")
        assert attributes is not None
        fitted = _documented_names(attributes)
        assert fitted and all(name.endswith("_") for name in fitted), "fitted attributes end in _"


def _non_default_params(estimator: type) -> dict[str, object]:
    gmm = DiagonalGMM.from_state(
        {"weights": np.array([1.0]), "means": np.zeros((1, 1)), "variances": np.ones((1, 1))}
    )
    values: dict[str, object] = {}
    for param in inspect.signature(estimator).parameters.values():
        if param.name == "gmm":
            values[param.name] = gmm
        elif isinstance(param.default, bool):
            values[param.name] = not param.default
        elif isinstance(param.default, str):
            values[param.name] = param.default + "-other"
        elif isinstance(param.default, int) or param.default is None:
            values[param.name] = 3
        else:
            values[param.name] = float(param.default) * 0.5
    return values


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda c: c.__name__)
def test_estimators_are_sklearn_estimators_with_keyword_only_params(estimator: type) -> None:
    assert issubclass(estimator, BaseEstimator)
    params = inspect.signature(estimator).parameters.values()
    positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    # the one required argument of FisherVectorEncoder (its GMM) may come first, as in sklearn
    assert positional == (["gmm"] if estimator is FisherVectorEncoder else [])
    values = _non_default_params(estimator)
    instance = estimator(**values)
    stored = instance.get_params(deep=False)
    assert stored.keys() == values.keys()
    assert all(stored[name] is values[name] for name in values), "params stored unchanged"
    clone(instance)  # sklearn's own check that __init__ stores every parameter as given
    assert repr(estimator(**{k: v for k, v in values.items() if k == "gmm"})).startswith(
        estimator.__name__ + "("
    )
