"""Retrieval evaluation (method spec §5.3, §6): rank the whole database by squared Euclidean
distance (stable sort), AP over the full ranked list, P@k, per-class averages, fold summaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "average_precision",
    "precision_at",
    "rank_database",
    "retrieval_metrics",
    "summarise_folds",
]


def rank_database(queries: np.ndarray, database: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Database indices sorted by ascending ‖q − b‖² for every query; ties keep database order.

    Distances are formed directly from differences (not ‖q‖² + ‖b‖² − 2q·b) in float64, so equal
    points get exactly equal distances.
    """
    queries = np.asarray(queries, dtype=np.float64)
    database = np.asarray(database, dtype=np.float64)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"shapes {queries.shape} and {database.shape} do not match")
    order = np.empty((queries.shape[0], database.shape[0]), dtype=np.int64)
    for start in range(0, queries.shape[0], chunk):
        diff = queries[start : start + chunk, None, :] - database[None, :, :]
        distances = np.einsum("qbd,qbd->qb", diff, diff)
        order[start : start + chunk] = np.argsort(distances, axis=1, kind="stable")
    return order


def average_precision(relevant: np.ndarray) -> np.ndarray:
    """AP of each row of a boolean relevance matrix (rows = queries, ranked list order).

    AP = (1 / #relevant) Σ_k rel_k · P@k over the whole list; 0 when nothing is relevant.
    """
    relevant = np.atleast_2d(np.asarray(relevant, dtype=bool))
    hits = np.cumsum(relevant, axis=1, dtype=np.float64)
    ranks = np.arange(1, relevant.shape[1] + 1, dtype=np.float64)
    n_relevant = relevant.sum(axis=1)
    summed = np.where(relevant, hits / ranks, 0.0).sum(axis=1)
    return np.divide(summed, n_relevant, out=np.zeros_like(summed), where=n_relevant > 0)


def precision_at(relevant: np.ndarray, k: int) -> np.ndarray:
    """P@k of each row: fraction of relevant items among the first k."""
    relevant = np.atleast_2d(np.asarray(relevant, dtype=bool))
    if not 1 <= k <= relevant.shape[1]:
        raise ValueError(f"k={k} outside 1..{relevant.shape[1]}")
    return relevant[:, :k].mean(axis=1)


def retrieval_metrics(
    query_features: np.ndarray,
    query_labels: np.ndarray,
    database_features: np.ndarray,
    database_labels: np.ndarray,
    ks: Sequence[int] = (5, 10),
) -> dict[str, object]:
    """mAP and P@k for one fold: overall and per query class.

    Returns {"mAP": float, "P@5": float, ..., "per_class": {label: {"mAP": ..., "P@5": ...,
    "n_queries": int}}, "ap": per-query AP array}.
    """
    query_labels = np.asarray(query_labels)
    database_labels = np.asarray(database_labels)
    order = rank_database(query_features, database_features)
    relevant = database_labels[order] == query_labels[:, None]
    per_query = {"mAP": average_precision(relevant)}
    for k in ks:
        per_query[f"P@{k}"] = precision_at(relevant, k)
    result: dict[str, object] = {name: float(v.mean()) for name, v in per_query.items()}
    per_class: dict[int, dict[str, float]] = {}
    for label in np.unique(query_labels):
        rows = query_labels == label
        scores = {name: float(v[rows].mean()) for name, v in per_query.items()}
        scores["n_queries"] = int(rows.sum())
        per_class[int(label)] = scores
    result["per_class"] = per_class
    result["ap"] = per_query["mAP"]
    return result


def summarise_folds(values: Iterable[float] | Mapping[object, float]) -> dict[str, float]:
    """Mean and population std (divide by the number of folds, as MATLAB `std(x, 1)`)."""
    if isinstance(values, Mapping):
        values = values.values()
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no fold values to summarise")
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=0)), "n": int(arr.size)}
