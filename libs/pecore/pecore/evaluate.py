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

    Parameters
    ----------
    queries : array_like of shape (n_queries, n_features)
        Query vectors.
    database : array_like of shape (n_database, n_features)
        Database vectors.
    chunk : int, default=256
        Queries per block (bounds the n_queries × n_database × n_features difference array).

    Returns
    -------
    ndarray of int64, shape (n_queries, n_database)
        Row q is the database ranked for query q, nearest first.

    Raises
    ------
    ValueError
        If the arrays are not 2-D with the same number of features.

    Examples
    --------
    >>> import numpy as np
    >>> database = np.array([[9.0], [1.0], [0.5], [11.0]])
    >>> rank_database(np.array([[0.0], [10.0]]), database)
    array([[2, 1, 0, 3],
           [0, 3, 1, 2]])
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

    Parameters
    ----------
    relevant : array_like of bool, shape (n_queries, n_ranked) or (n_ranked,)
        Whether the item at each rank is relevant to the query.

    Returns
    -------
    ndarray of float64, shape (n_queries,)
        The average precision of each query.

    Examples
    --------
    >>> import numpy as np
    >>> average_precision(np.array([[True, False, True, False], [False] * 4])).round(3)
    array([0.833, 0.   ])
    """
    relevant = np.atleast_2d(np.asarray(relevant, dtype=bool))
    hits = np.cumsum(relevant, axis=1, dtype=np.float64)
    ranks = np.arange(1, relevant.shape[1] + 1, dtype=np.float64)
    n_relevant = relevant.sum(axis=1)
    summed = np.where(relevant, hits / ranks, 0.0).sum(axis=1)
    return np.divide(summed, n_relevant, out=np.zeros_like(summed), where=n_relevant > 0)


def precision_at(relevant: np.ndarray, k: int) -> np.ndarray:
    """P@k of each row: fraction of relevant items among the first k.

    Parameters
    ----------
    relevant : array_like of bool, shape (n_queries, n_ranked) or (n_ranked,)
        Whether the item at each rank is relevant to the query.
    k : int
        Cut-off rank, 1 ≤ k ≤ n_ranked.

    Returns
    -------
    ndarray of float64, shape (n_queries,)
        The precision at k of each query.

    Raises
    ------
    ValueError
        If k is outside 1..n_ranked.

    Examples
    --------
    >>> import numpy as np
    >>> precision_at(np.array([[True, False, True, False]]), 2)
    array([0.5])
    """
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

    The whole database is ranked for every query (`rank_database`); an item is relevant when
    its label equals the query's.

    Parameters
    ----------
    query_features : array_like of shape (n_queries, n_features)
        Query vectors.
    query_labels : array_like of int, shape (n_queries,)
        Query classes.
    database_features : array_like of shape (n_database, n_features)
        Database vectors.
    database_labels : array_like of int, shape (n_database,)
        Database classes.
    ks : sequence of int, default=(5, 10)
        Cut-offs of the reported P@k.

    Returns
    -------
    dict
        {"mAP": float, "P@5": float, ..., "per_class": {label: {"mAP": ..., "P@5": ...,
        "n_queries": int}}, "ap": per-query AP array}.

    Examples
    --------
    >>> import numpy as np
    >>> database = np.array([[9.0], [1.0], [0.5], [11.0]])
    >>> scores = retrieval_metrics(
    ...     np.array([[0.0], [10.0]]), np.array([0, 0]), database, np.array([1, 0, 0, 1]), ks=(1,)
    ... )
    >>> round(scores["mAP"], 3), scores["P@1"]  # query 2 finds its class at ranks 3 and 4
    (0.708, 0.5)
    >>> scores["per_class"][0]["n_queries"]
    2
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
    """Mean and population std (divide by the number of folds, as MATLAB `std(x, 1)`).

    Parameters
    ----------
    values : iterable of float or mapping to float
        One score per fold (a mapping's values are used).

    Returns
    -------
    dict
        {"mean": float, "std": float, "n": int}.

    Raises
    ------
    ValueError
        If there are no values.

    Examples
    --------
    >>> summary = summarise_folds({1: 0.8, 2: 0.9, 3: 1.0})
    >>> round(summary["mean"], 3), round(summary["std"], 3), summary["n"]
    (0.9, 0.082, 3)
    """
    if isinstance(values, Mapping):
        values = values.values()
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no fold values to summarise")
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=0)), "n": int(arr.size)}
