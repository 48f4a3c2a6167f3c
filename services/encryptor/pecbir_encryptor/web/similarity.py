"""The page's 0–100 similarity: what a clinician reads instead of the learned metric's distance.

A distance of the learned metric means nothing by itself (its scale differs per collection and
per model), so it is first made relative to the query's median distance to that collection,
``r = d / median``; ``closeness = max(0, 1 − r)`` is 1 for the query's own features and 0 for
a case no closer than a typical one of that collection. That alone is not readable enough:
the learned metric pulls the cases of one class so close together that, seen from a query,
they lie within a fraction of a percent of each other (measured on the bench-ui data: the ten
nearest of 72 within 0.3 %, median of 12 queries), so every hit of a page would read the same
number.

The score is therefore rank-aware:

    similarity = max(0, 100 · closeness − n_closer)

where ``n_closer`` counts the cases searched (every selected collection, pooled on the
relative distance r) that are closer to the query, ties counting half. It keeps both ends of
the scale (100: the query's own features and nothing closer; 0: no closer than a typical case
of its collection), it is monotone (a closer case never scores lower), equal distances get
equal scores, and two cases at different distances are at least one point apart until the
scale reaches 0, so their rounded numbers differ: the tiles of a page read different numbers
wherever the metric tells the cases apart at all, and a collection whose cases are all far
from the query still reads low.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["relative_distances", "similarity_scores"]


def relative_distances(distances: np.ndarray) -> np.ndarray:
    """A query's distances to one collection, over their median (0/0 counts as 0; d/0 as ∞).

    Parameters
    ----------
    distances
        The query's distances to the collection's images (all of them, or as many as the
        cloud returned).
    """
    distances = np.asarray(distances, dtype=np.float64)
    if distances.size == 0:
        return distances
    reference = float(np.median(distances))
    if reference <= 0:
        return np.where(distances <= 0, 0.0, np.inf)
    return distances / reference


def similarity_scores(per_collection: Sequence[np.ndarray]) -> list[np.ndarray]:
    """0–100 similarities (floats) of one query's hits, collection by collection.

    Parameters
    ----------
    per_collection
        The query's distances to each searched collection's images.

    Returns
    -------
    list of numpy.ndarray
        The scores, in the same layout (module docstring: what they mean).
    """
    relative = [relative_distances(d) for d in per_collection]
    pooled = np.sort(np.concatenate(relative)) if relative else np.zeros(0)
    scores = []
    for r in relative:
        closer = np.searchsorted(pooled, r, side="left")
        ties = np.searchsorted(pooled, r, side="right") - closer - 1  # others at the same r
        n_closer = closer + ties / 2
        closeness = np.clip(1 - r, 0, 1)
        scores.append(np.maximum(0.0, 100 * closeness - n_closer))
    return scores
