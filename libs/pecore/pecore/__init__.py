"""pecore: the science of pe-cbir, with no web, contract or service code.

Perceptual encryption of 8-bit brain MRI slices, and the Cheng et al. 2016 retrieval pipeline
that runs unchanged on plain and on encrypted images (the tumour masks travel in the clear).
Everything takes and returns numpy arrays; estimators follow scikit-learn's conventions
(keyword-only parameters stored unchanged, fitted attributes ending in ``_``).

Retrieval (method spec §1–§6); every name listed in these modules' ``__all__`` is also
importable from the package itself (``from pecore import CBIRPipeline``), loaded on first use
so that ``import pecore`` stays cheap:

====================  ===================================================================
``pecore.roi``        the tumour mask dilated by a disk, intensity-order subregions
``pecore.features``   min-max normalisation, ROI patches, the training sample, `PatchPCA`
``pecore.fisher``     `DiagonalGMM` (VLFeat-like EM) and the `FisherVectorEncoder`
``pecore.metric``     closed-form metric learning, `CFML`
``pecore.pipeline``   `CBIRPipeline` (fit / transform / save / load) and its building blocks
``pecore.evaluate``   database ranking, AP, P@k, per-class and per-fold summaries
====================  ===================================================================

The evaluation protocol of the paper's Tables 1–2 (one query fold, every D, CFML dims 1..10)
is ``pecore.model_selection.evaluate_fold``; the paper's reported numbers are
``pecore.model_selection.paper_tables()`` (the data file ``pecore/data/paper_tables.json``).

Encryption and security analysis (import the module):

==========================  =============================================================
``pecore.keys``             SSLM key streams, master keys, per-image key derivation
``pecore.cipher``           the scheme registry `SCHEMES`: the paper's cipher and baselines
``pecore.cipher_variants``  tile-scrambled variants ``<inner>-bs<b>`` of any scheme
``pecore.cipher_roi``       pe-roi: only the owner's ROI, keyed tile scramble, then ours
``pecore.envelope``         owner side: 8-bit rule, key modes, record, integrity tag, stacks
``pecore.attacks``          attacks on the ciphers, as measurement tools
``pecore.attack_suite``     the security report's attack suite and its scoring
``pecore.jigsaw``           jigsaw solver for tile-scrambled ciphers, scored vs the truth
``pecore.cipherstats``      figures of merit of cipher images
``pecore.datasets``         the figshare brain-tumour set and synthetic stand-ins
``pecore.io``               reading and writing grey images (PNG, NPY, DICOM)
==========================  =============================================================

Examples
--------
>>> import pecore
>>> from pecore.pipeline import CBIRPipeline
>>> pecore.CBIRPipeline is CBIRPipeline
True
"""

from __future__ import annotations

import importlib

# module -> its public names; `tests/pecore/test_public_api.py` checks these equal each
# module's `__all__`, so the package API cannot drift from the modules'.
_EXPORTS_BY_MODULE: dict[str, tuple[str, ...]] = {
    "pecore.roi": ("dilate_mask", "hazen_quantiles", "intensity_regions"),
    "pecore.features": (
        "ImagePatches",
        "PatchPCA",
        "extract_patches",
        "minmax_normalise",
        "roi_patches",
        "training_sample",
    ),
    "pecore.fisher": ("DiagonalGMM", "FisherVectorEncoder", "moments"),
    "pecore.metric": ("CFML", "pair_scatter"),
    "pecore.pipeline": (
        "CBIRPipeline",
        "PatchModel",
        "dilated_rois",
        "encode_images",
        "fit_patch_model",
        "patch_model_arrays",
        "patch_model_from_arrays",
    ),
    "pecore.evaluate": (
        "average_precision",
        "precision_at",
        "rank_database",
        "retrieval_metrics",
        "summarise_folds",
    ),
}
_MODULE_OF: dict[str, str] = {
    name: module for module, names in _EXPORTS_BY_MODULE.items() for name in names
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> object:
    # PEP 562: the submodule (numpy, scipy, numba, scikit-learn) is imported on first use only
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'pecore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
