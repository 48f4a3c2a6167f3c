"""The scaling benchmark measures the real search index, and its shortcut is faithful."""

from __future__ import annotations

import numpy as np

from pecbir.commands.bench_scaling import _filled_index, measure_search
from pecbir_search.index import VectorIndex


def test_bulk_filled_index_answers_like_one_filled_by_upserts():
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((300, 10)).astype(np.float32)
    vectors[10:20] = vectors[3]  # ties must come out in insertion order in both
    upserted = VectorIndex("v0001", 10, capacity=8)
    for i, vector in enumerate(vectors):
        upserted.upsert(f"{i:032x}", vector, None)
    bulk = _filled_index(vectors)
    for query in [*rng.standard_normal((20, 10)).astype(np.float32), vectors[3]]:
        a_ids, a_dist, _ = upserted.search(query, 15)
        b_ids, b_dist, _ = bulk.search(query, 15)
        assert a_ids == b_ids
        np.testing.assert_array_equal(a_dist, b_dist)
    bulk.upsert("f" * 32, vectors[0], 2)  # and it stays a working index
    assert len(bulk) == 301 and "f" * 32 in bulk


def test_service_and_faiss_return_the_same_neighbours():
    rows = measure_search([200, 2000], dim=10, n_queries=20, k=10, progress=False)
    assert [r["n_vectors"] for r in rows] == [200, 2000]
    for row in rows:
        assert row["same_neighbours"] == 1.0  # both exact, continuous data: no ties
        assert row["service"]["p99_ms"] >= row["service"]["p50_ms"] > 0
        assert row["upsert_us"] > 0
