"""The search engine works with any `VectorIndex`; the exact index is one."""

from __future__ import annotations

import numpy as np

from pecbir_search.index import ExactVectorIndex, VectorIndex


def test_the_exact_index_implements_the_protocol():
    index = ExactVectorIndex("v0001", 3)
    assert isinstance(index, VectorIndex)
    index.upsert("a" * 32, np.array([0.0, 1.0, 2.0]), 1)
    ids, distances, labels = index.search(np.zeros(3), 1)
    assert ids == ["a" * 32] and distances.tolist() == [5.0] and labels.tolist() == [1]
