"""The evaluation protocol of Ahmad et al. 2025, Tables 1–2 (method spec §0.1, §6, §7.2).

One query fold at a time: learn PCA + GMM(D) + CFML on the database folds, rank the database
for every query, and score mAP / P@5 / P@10 for every CFML output dimension in `CFML_DIMS`.
Work shared across the dictionary sizes D (patches, PCA, one pass over the images) is done
once.  Caching, progress bars and file writing belong to the caller (`pecbir experiment`).

`paper_tables` returns the numbers the paper reports, for side-by-side comparison only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources

import numpy as np

__all__ = [
    "CFML_DIMS",
    "METRICS",
    "evaluate_fold",
    "fold_seed",
    "lambda_key",
    "paper_tables",
    "unit_at_lambda",
]

#: CFML output dimensions scored for every (fold, D); the paper's headline is the last.
CFML_DIMS = tuple(range(1, 11))
#: The retrieval scores of every (fold, D, dim), as `pecore.evaluate.retrieval_metrics` names them.
METRICS = ("mAP", "P@5", "P@10")


def fold_seed(seed_words: Sequence[int]) -> int:
    """The random state of one (condition, fold): a 32-bit word of ``SeedSequence(seed_words)``.

    Parameters
    ----------
    seed_words : sequence of int
        Non-negative integers that name the unit (e.g. base seed, fold, a hash of the condition).

    Returns
    -------
    int
        A seed for `pecore.pipeline.fit_patch_model`.
    """
    return int(np.random.SeedSequence(list(seed_words)).generate_state(1)[0])


def evaluate_fold(
    images: np.ndarray | Sequence[np.ndarray],
    masks: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    folds: np.ndarray,
    *,
    query_fold: int,
    dictionary_sizes: Sequence[int],
    n_regions: int,
    patch_size: int,
    radius: int,
    pca_energy: float,
    n_train_patches: int,
    metric_lambda: float,
    random_state: int,
    n_jobs: int = 1,
    rois: Sequence[np.ndarray] | None = None,
    progress: Callable[[int], object] | None = None,
    sealed: bool = False,
    patch_tile: int | None = None,
    extra_lambdas: Sequence[float] = (),
) -> dict[int, dict[str, object]]:
    """Learn on the database folds, evaluate the queries of `query_fold`, for every D.

    With `sealed` the fold runs as a sealed collection (issue 12) does: the owner fits the
    published patch model on its plain database images and featurises every image itself
    (`pecore.owner_features.owner_fisher_vectors`); the cloud learns CFML from the database
    images' float32 vectors and labels and ranks the queries' vectors, never seeing a pixel.

    Parameters
    ----------
    images : array (N, H, W) uint8 or sequence of 2-D uint8 arrays
        Plain or cipher images, every fold.
    masks : array (N, H, W) bool or sequence of 2-D bool arrays
        Tumour masks (undilated), aligned with `images`.
    labels : numpy.ndarray
        Class label of every image.
    folds : numpy.ndarray
        Fold of every image; images of `query_fold` are the queries, the others the database.
    query_fold : int
        The fold whose images are queried.
    dictionary_sizes : sequence of int
        GMM sizes D; one result per size.
    n_regions : int
        Intensity-order subregions of the Fisher vectors.
    patch_size : int
        Side of the raw square patches.
    radius : int
        ROI dilation radius (ignored where `rois` is given).
    pca_energy : float
        Fraction of patch variance the PCA keeps.
    n_train_patches : int
        Patches sampled from the database images to fit PCA and GMMs.
    metric_lambda : float
        CFML regularisation.
    random_state : int
        Seed of the patch sampling and the GMMs (see `fold_seed`).
    n_jobs : int, default 1
        Encoding threads.
    rois : sequence of 2-D bool arrays, optional
        The masks already dilated by `radius` (shared across folds and conditions).
    progress : callable, optional
        Called with the number of images encoded since the last call.
    sealed : bool, default False
        Featurise as the owner of a sealed collection (`images` must then be plain).
    patch_tile : int, optional
        Tile-reflected patches (`pecore.features.extract_patches`' `tile`; pe-roi's "-rf"
        spellings): every patch from its centre's own tile, reflected at the tile border.
    extra_lambdas : sequence of float, default ()
        More CFML ridge values scored on the same Fisher vectors (`pecore.metric.CFML.fit_path`:
        the λ-independent work once).  Empty: `metric_lambda` alone, fitted as always.

    Returns
    -------
    dict of int to dict
        Per D: fold, sizes, model facts (PCA/FV dimensions, GMM iterations, CFML rank and
        eigenvalues), ``timings_s`` and ``by_dim`` (CFML dim → mAP, P@5, P@10, per_class), all
        at `metric_lambda`; with `extra_lambdas` also ``extra_lambdas``: `lambda_key`(λ) →
        {metric_lambda, cfml_rank, cfml_eigenvalues, cfml_s, by_dim} per extra λ
        (`unit_at_lambda` gives the unit as a run with that `metric_lambda` would).
    """
    from pecore.evaluate import retrieval_metrics
    from pecore.fisher import FisherVectorEncoder
    from pecore.metric import CFML
    from pecore.owner_features import owner_fisher_vectors
    from pecore.pipeline import encode_images, fit_patch_model

    if sealed and patch_tile is not None:
        raise ValueError("tile-reflected patches (patch_tile) are a pe-roi option, not sealed's")
    sizes = list(dictionary_sizes)
    extras = [float(reg) for reg in extra_lambdas if float(reg) != float(metric_lambda)]
    train = np.flatnonzero(folds != query_fold)
    query = np.flatnonzero(folds == query_fold)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model = fit_patch_model(
        [images[i] for i in train],
        [masks[i] for i in train],
        sizes,
        patch_size=patch_size,
        radius=radius,
        pca_energy=pca_energy,
        n_train_patches=n_train_patches,
        random_state=random_state,
        rois=None if rois is None else [rois[i] for i in train],
        patch_tile=patch_tile,
    )
    timings["pca_gmm_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if sealed:
        # the owner: its plain images under the published model; the cloud gets the vectors
        fvs = owner_fisher_vectors(
            images,
            masks,
            model,
            dictionary_sizes=sizes,
            n_regions=n_regions,
            patch_size=patch_size,
            radius=radius,
            rois=rois,
            n_jobs=n_jobs,
            progress=progress,
        )
    else:
        encoders = [FisherVectorEncoder(model.gmms[s], n_regions=n_regions) for s in sizes]
        fvs = encode_images(
            images,
            masks,
            model.pca,
            encoders,
            patch_size=patch_size,
            radius=radius,
            rois=rois,
            n_jobs=n_jobs,
            progress=progress,
            patch_tile=patch_tile,
        )
    timings["encode_s"] = time.perf_counter() - start
    out: dict[int, dict[str, object]] = {}
    for size in sizes:
        fv = fvs.pop(0)  # dropped after its metric: at D = 64 one FV matrix is 1 GB
        fv_dim = int(fv.shape[1])
        start = time.perf_counter()
        # fv[train] is a fresh copy already, so CFML may centre it in place
        estimator = CFML(reg=metric_lambda, n_components=max(CFML_DIMS), copy=False)
        if extras:
            metrics = estimator.fit_path(fv[train], labels[train], [metric_lambda, *extras])
        else:  # the one-λ path as it always ran
            metrics = [estimator.fit(fv[train], labels[train])]
        fitted = []
        for metric in metrics:
            projected = metric.transform(fv)
            by_dim = {}
            for dim in CFML_DIMS:
                if dim > projected.shape[1]:
                    break
                scores = retrieval_metrics(
                    projected[query, :dim], labels[query], projected[train, :dim], labels[train]
                )
                scores.pop("ap")
                scores["per_class"] = {str(c): v for c, v in scores["per_class"].items()}
                by_dim[str(dim)] = scores
            fitted.append((metric, by_dim))
        cfml_s = (time.perf_counter() - start) / len(metrics)  # per λ, the shared work split
        del fv
        metric, by_dim = fitted[0]
        gmm = model.gmms[size]
        out[size] = {
            "fold": query_fold,
            "D": size,
            "n_query": int(query.size),
            "n_database": int(train.size),
            "pca_dim": int(model.pca.n_components_),
            "fv_dim": fv_dim,
            "n_training_patches": model.n_training_patches,
            "gmm_iterations": int(gmm.n_iter_),
            "gmm_converged": bool(gmm.converged_),
            "gmm_restarts": int(gmm.n_restarts_),
            "cfml_rank": int(metric.rank_),
            "cfml_eigenvalues": metric.eigenvalues_.tolist(),
            "seed": random_state,
            "timings_s": {**timings, "cfml_s": cfml_s},
            "by_dim": by_dim,
        }
        if extras:
            out[size]["metric_lambda"] = float(metric_lambda)
            out[size]["extra_lambdas"] = {
                lambda_key(reg): {
                    "metric_lambda": reg,
                    "cfml_rank": int(other.rank_),
                    "cfml_eigenvalues": other.eigenvalues_.tolist(),
                    "cfml_s": cfml_s,
                    "by_dim": other_by_dim,
                }
                for reg, (other, other_by_dim) in zip(extras, fitted[1:], strict=True)
            }
    return out


def lambda_key(reg: float) -> str:
    """The spelling of a CFML ridge λ in results (``repr`` of the float: "0.00015").

    Examples
    --------
    >>> lambda_key(1.5e-4), lambda_key(1)
    ('0.00015', '1.0')
    """
    return repr(float(reg))


def unit_at_lambda(unit: dict[str, object], reg: float) -> dict[str, object]:
    """One `evaluate_fold` result (one D) as a run with ``metric_lambda=reg`` would return it.

    Parameters
    ----------
    unit : dict
        A result of `evaluate_fold`: `reg` is its ``metric_lambda`` or among its
        ``extra_lambdas`` (a unit without either key was fitted at one λ, taken to be `reg`).
    reg : float
        The ridge λ.

    Returns
    -------
    dict
        The unit with the CFML facts, ``timings_s["cfml_s"]`` and ``by_dim`` at `reg`, and
        neither ``metric_lambda`` nor ``extra_lambdas``.

    Raises
    ------
    KeyError
        If the unit holds no result at `reg`.
    """
    base = {k: v for k, v in unit.items() if k not in ("extra_lambdas", "metric_lambda")}
    extras = unit.get("extra_lambdas") or {}
    if lambda_key(reg) not in extras:
        if float(unit.get("metric_lambda", reg)) != float(reg):
            raise KeyError(f"no result at λ = {reg} in this unit")
        return base
    at = extras[lambda_key(reg)]
    return {
        **base,
        "cfml_rank": at["cfml_rank"],
        "cfml_eigenvalues": at["cfml_eigenvalues"],
        "timings_s": {**base["timings_s"], "cfml_s": at["cfml_s"]},
        "by_dim": at["by_dim"],
    }


@cache
def paper_tables() -> dict[str, object]:
    """The numbers Ahmad et al. 2025 report (``pecore/data/paper_tables.json``), read once.

    Returns
    -------
    dict
        ``table1``: {"rows": {D: {condition: [mAP, P@5, P@10]}}} (mean % over 5 folds);
        ``table2``: {"rows": {condition: {class: [mAP, P@5, P@10]}}} (D = 64);
        ``table3_seconds``: {"rows": {scheme: [encrypt s, decrypt s]}} (their machine).
        Conditions are spelled as `pecbir experiment` names them ("ours/per-image").
    """
    text = resources.files("pecore").joinpath("data/paper_tables.json").read_text("utf-8")
    return json.loads(text)
