"""The scaling benchmark measures the real search index, and its alternatives answer the same."""

from __future__ import annotations

import numpy as np

from pecbir.commands.bench_scaling import BlasExpansionKnn, measure_search
from pecbir_search.index import ExactVectorIndex as VectorIndex


def test_blas_alternative_returns_the_index_answer_including_ties():
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((3000, 10)).astype(np.float32)
    vectors[10:20] = vectors[3]  # ties must come out in insertion order in both
    vectors[2500:2510] = vectors[3]
    index = VectorIndex("v0001", 10, capacity=8)
    for i, vector in enumerate(vectors):
        index.upsert(f"{i:032x}", vector, None)
    blas = BlasExpansionKnn(vectors)
    for query in [*rng.standard_normal((20, 10)).astype(np.float32), vectors[3], vectors[2505]]:
        for k in (1, 10, 15, 25):
            ids, _d, _l = index.search(query, k)
            assert [int(i, 16) for i in ids] == blas.search(query, k).tolist()


def test_service_and_faiss_return_the_same_neighbours():
    rows = measure_search([200, 2000], dim=10, n_queries=20, k=10, progress=False, repeats=2)
    assert [r["n_vectors"] for r in rows] == [200, 2000]
    for row in rows:
        assert row["same_neighbours"] == 1.0  # both exact, continuous data: no ties
        assert row["blas_identical_answers"] == 1.0
        assert row["service"]["p99_ms"] >= row["service"]["p50_ms"] > 0
        assert row["upsert_us"] > 0 and row["rebuild_s"] > 0
