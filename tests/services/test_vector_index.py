"""The search service's vector index: exact, stable top-k; cheap appends; consistent snapshots."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pecbir_search.index import ExactVectorIndex as VectorIndex
from pecbir_search.index import compile_kernels


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k nearest by the direct squared distance, ties in database order.

    The distance is the index's definition: float32, `(x_j - q_j)^2` summed over j in order.
    """
    return np.argsort(direct_distances(vectors, query), kind="stable")[:k]


def direct_distances(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    distances = np.zeros(vectors.shape[0], np.float32)
    for j in range(vectors.shape[1]):
        distances += (vectors[:, j] - np.float32(query[j])) ** 2
    return distances


def filled(vectors: np.ndarray, labels=None, capacity: int = 4) -> VectorIndex:
    index = VectorIndex("v0001", vectors.shape[1], capacity=capacity)
    for i, vector in enumerate(vectors):
        index.upsert(f"id{i}", vector, None if labels is None else int(labels[i]))
    return index


@pytest.mark.parametrize("n, dim", [(1, 3), (9, 10), (257, 10), (3000, 10), (5000, 2), (700, 33)])
def test_top_k_equals_brute_force_with_duplicates(n, dim):
    rng = np.random.default_rng(n + dim)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    if n > 20:
        # Duplicates spread over blocks (the kernel works in blocks of 256 rows) and around the
        # k-th place: ties must come out in database order, also at the border of the top k.
        copies = rng.choice(n, size=n // 5, replace=False)
        vectors[copies] = vectors[rng.integers(0, 4, size=copies.shape[0])]
    labels = rng.integers(0, 3, size=n)
    index = filled(vectors, labels)
    queries = [*rng.standard_normal((15, dim)).astype(np.float32), *vectors[:4]]
    queries.append(vectors[0] + np.float32(0.01))
    for query in queries:
        for k in (1, 5, 10, 37, n + 3):
            expected = brute_force(vectors, query, k)
            ids, distances, found_labels = index.search(query, k)
            assert ids == [f"id{i}" for i in expected]
            np.testing.assert_array_equal(distances, direct_distances(vectors[expected], query))
            # and within float32 rounding of the float64 distances
            exact = ((vectors[expected].astype(float) - query.astype(float)) ** 2).sum(axis=1)
            np.testing.assert_allclose(distances, exact, rtol=1e-5, atol=1e-5)
            assert distances.dtype == np.float32 and np.all(np.diff(distances) >= 0)
            np.testing.assert_array_equal(found_labels, labels[expected])


def test_ties_at_the_border_keep_database_order():
    # Twenty copies of one point, nearer points before and after them: the top 7 must be the
    # nearer points, then the *earliest* copies, whatever block each copy is in.
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((2000, 4)).astype(np.float32) + 50  # all far from the query
    query = np.zeros(4, np.float32)
    copies = np.sort(rng.choice(np.arange(10, 2000), size=20, replace=False))
    vectors[copies] = 1.0
    nearer = [1500, 3]  # inserted late and early
    vectors[nearer] = 0.5
    index = filled(vectors)
    ids, distances, _ = index.search(query, 7)
    assert ids == ["id3", "id1500", *(f"id{i}" for i in copies[:5])]
    assert distances.tolist() == [1.0, 1.0, 4.0, 4.0, 4.0, 4.0, 4.0]


def test_appends_after_a_snapshot_leave_the_snapshot_unchanged():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((40, 5)).astype(np.float32)
    index = filled(vectors[:3], capacity=3)
    snapshot = index._view
    before = index.search(vectors[0], 10)
    for i in range(3, 40):  # several capacity doublings
        index.upsert(f"id{i}", vectors[i], 1)
    assert len(index) == 40 and index.capacity >= 40 and snapshot.n == 3
    # The old view still answers over its three rows, with the same result as before.
    old = VectorIndex("v0001", 5)
    old._view = snapshot
    after = old.search(vectors[0], 10)
    assert after[0] == before[0] == [f"id{i}" for i in brute_force(vectors[:3], vectors[0], 10)]
    np.testing.assert_array_equal(after[1], before[1])
    # And the live index answers over everything.
    assert index.search(vectors[39], 1)[0] == ["id39"]
    assert index.search(vectors[0], 40)[0] == [
        f"id{i}" for i in brute_force(vectors, vectors[0], 40)
    ]


def test_redelivery_adds_no_row_and_a_changed_row_is_copied_not_overwritten():
    vectors = np.eye(4, dtype=np.float32)
    index = filled(vectors, labels=[0, 1, 2, 3])
    view = index._view
    index.upsert("id2", vectors[2], 2)  # identical re-delivery: nothing changes
    assert index._view is view and len(index) == 4
    index.upsert("id2", np.full(4, 9, np.float32), 1)  # a changed record
    assert len(index) == 4 and index._view is not view
    np.testing.assert_array_equal(view.columns[:, 2], vectors[2])  # readers' snapshot intact
    ids, _, labels = index.search(np.full(4, 9, np.float32), 1)
    assert ids == ["id2"] and labels.tolist() == [1]
    with pytest.raises(ValueError, match="dims"):
        index.upsert("bad", np.zeros(3), None)
    with pytest.raises(ValueError, match="dims"):
        index.search(np.zeros(3), 1)


def test_empty_index_and_k_beyond_n():
    index = VectorIndex("v0001", 3)
    ids, distances, labels = index.search(np.zeros(3), 5)
    assert ids == [] and distances.shape == (0,) and labels.shape == (0,)
    index.upsert("a", np.ones(3), None)
    ids, distances, labels = index.search(np.zeros(3), 5)
    assert ids == ["a"] and distances.tolist() == [3.0] and labels.tolist() == [-1]


def test_concurrent_readers_see_only_whole_rows_while_the_follower_appends():
    # Row i is the constant vector (total - i) and the query is the origin, so the nearest row of
    # a consistent snapshot is its newest one, at a distance its id determines. A row published
    # before it is (completely) written holds zeros: it would come first at a distance matching
    # no id.
    compile_kernels()  # else the readers spend the whole test waiting for the JIT
    dim, total = 8, 6000
    index = VectorIndex("v0001", dim, capacity=1)
    index.upsert("0", np.full(dim, total, np.float32), None)
    query = np.zeros(dim, np.float32)
    errors: list[str] = []
    reads: list[int] = []
    done = threading.Event()

    def read() -> None:
        last = 0
        while not done.is_set():
            ids, distances, _ = index.search(query, 3)
            newest = int(ids[0])
            if newest < last:
                errors.append(f"went back from {last} to {newest}")
            last = newest
            for image_id, distance in zip(ids, distances, strict=True):
                row = np.full((1, dim), total - int(image_id), np.float32)
                expected = direct_distances(row, query)[0]
                if distance != expected:
                    errors.append(f"row {image_id} at distance {distance}, expected {expected}")
            if [int(i) for i in ids] != list(range(newest, max(newest - 3, -1), -1)):
                errors.append(f"not the newest rows: {ids}")
            reads.append(newest)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for i in range(1, total):
            index.upsert(str(i), np.full(dim, total - i, np.float32), None)
            if i % 8 == 0:
                time.sleep(0)  # let readers in, as the follower does between stream reads
    finally:
        done.set()
        for reader in readers:
            reader.join()
    assert not errors, errors[:5]
    assert len(index) == total
    assert len(set(reads)) > 50  # the readers did run while rows were appended


def test_version_swap_is_atomic_for_concurrent_readers():
    # Readers take `state.serving` once per query (as the app does) while the follower fills the
    # pending version (a re-index: the same images, new vectors of another dimension) and swaps
    # it in: every answer must come wholly from one version, and the new version serves only
    # once it holds every image the old one holds.
    from pecbir_contracts.layout import CollectionLayout
    from pecbir_search.engine import CollectionState, Version

    compile_kernels()
    rng = np.random.default_rng(3)
    vectors = {
        "v0001": rng.standard_normal((300, 3)).astype(np.float32),
        "v0002": rng.standard_normal((300, 5)).astype(np.float32),
    }
    norms = {name: np.sort((v.astype(np.float64) ** 2).sum(axis=1)) for name, v in vectors.items()}
    state = CollectionState(CollectionLayout("hosp-a", "brain"))
    old = VectorIndex("v0001", 3)
    for i, vector in enumerate(vectors["v0001"]):
        old.upsert(f"img-{i}", vector, None)
    state.serving = Version("v0001", object(), old)
    with state.lock:
        state.set_pending(Version("v0002", object(), VectorIndex("v0002", 5)))
    errors: list[str] = []
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            serving = state.serving
            query = np.zeros(serving.index.dim, np.float32)
            ids, distances, _ = serving.index.search(query, 500)
            answer = np.sort(np.asarray(distances, dtype=np.float64))
            if len(ids) != 300 or not np.allclose(answer, norms[serving.name], rtol=1e-5):
                errors.append(f"{serving.name} answered {len(ids)} ids of another version")
            seen.append((serving.name, len(ids)))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for i, vector in enumerate(vectors["v0002"]):
            with state.lock:
                assert state.pending is not None, f"swapped after {i} of 300 images"
                state.upsert(state.pending, f"img-{i}", vector, None)
                state._maybe_swap()
    finally:
        done.set()
        for reader in readers:
            reader.join()
    assert not errors, errors[:5]
    assert state.serving.name == "v0002" and state.pending is None
    names = [name for name, _ in seen]
    first_new = names.index("v0002") if "v0002" in names else len(names)
    assert set(names[:first_new]) <= {"v0001"}  # never back to the old version per reader order
