"""In-memory exact k-NN over projected vectors: one float32 matrix per collection and model version.

`VectorIndex` is what the search engine needs of an index (a faiss or GPU index can plug in
through `SearchEngine(index_factory=...)`); `ExactVectorIndex` is the implementation the
service runs.

Layout and concurrency
----------------------
Vectors are stored column-wise, a `(dim, capacity)` float32 matrix, so that the distance kernel
streams each coordinate over many rows at once (SIMD across rows; the projected dimension is
small, ~10). Capacity doubles when full, so an append is amortised O(1); ids go to a list that
only ever grows. Readers work on an immutable `_View` (matrix, labels, ids, n) and read only its
first `n` rows: a writer fills row `n` of the shared buffers *before* it publishes the view with
`n + 1` (one reference assignment, atomic), so a reader never sees a half-written row. Changing
a row a published view already holds (a re-delivered image whose vector or label differs) copies
the buffers first, for the same reason; identical re-deliveries change nothing.

Distances
---------
Exact squared Euclidean distance in the direct form, `sum_j (x_j - q_j)^2` in float32 with the
coordinates summed in order, by a numba kernel that keeps a running top-k (a sorted insertion
buffer). A candidate replaces the current k-th only if strictly nearer, and inserts after equal
distances, so ties keep database (insertion) order: the result equals
`np.argsort(distances, kind="stable")[:k]`. The kernel releases the GIL, so concurrent queries
of a multi-threaded server run in parallel. Measured against the BLAS expansion
`|x|^2 - 2 q.x + |q|^2` (which then needs a re-ranked candidate border to be exact) and faiss
`IndexFlatL2`: see docs/scaling.md.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numba
import numpy as np

# Rows per distance block: the block's distances stay in L1 while the top-k scan reads them.
_BLOCK = 256


@numba.njit(nogil=True, cache=False)
def _block_distances(
    columns: np.ndarray, start: int, stop: int, query: np.ndarray, out: np.ndarray
) -> None:
    """out[:stop-start] = squared distances of rows start..stop to query (coordinates in order)."""
    block = out[: stop - start]
    block[:] = 0
    for j in range(columns.shape[0]):
        coordinate = columns[j, start:stop]  # a contiguous slice: the loop below vectorises
        q = query[j]
        for i in range(stop - start):
            delta = coordinate[i] - q
            block[i] += delta * delta


@numba.njit(nogil=True, cache=False)
def _top_k(columns: np.ndarray, n: int, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, squared distances) of the k nearest of the first n rows, nearest first, stable."""
    best_distance = np.full(k, np.inf, np.float32)
    best_row = np.full(k, -1, np.int64)
    count = 0
    threshold = np.float32(np.inf)
    block = np.empty(_BLOCK, np.float32)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        _block_distances(columns, start, stop, query, block)
        for i in range(stop - start):
            distance = block[i]
            if distance < threshold:  # strict: an equal, later row never displaces an earlier one
                slot = count if count < k else k - 1
                while slot > 0 and best_distance[slot - 1] > distance:
                    best_distance[slot] = best_distance[slot - 1]
                    best_row[slot] = best_row[slot - 1]
                    slot -= 1
                best_distance[slot] = distance
                best_row[slot] = start + i
                if count < k:
                    count += 1
                if count == k:
                    threshold = best_distance[k - 1]
    return best_row[:count], best_distance[:count]


def compile_kernels() -> None:
    """Compile the k-NN kernel now (about a second) rather than in the first query."""
    _top_k(np.zeros((1, 1), np.float32), 1, np.zeros(1, np.float32), 1)


@runtime_checkable
class VectorIndex(Protocol):
    """The vectors of one model version, searchable by k-NN; what the search engine needs.

    Implementations must let `search` run concurrently with `upsert` (queries never wait for
    indexing) and return ties in insertion order, so that results are reproducible.

    Attributes
    ----------
    version
        The model version the vectors were projected with.
    dim
        Dimension of the vectors.
    nbytes
        Bytes the index holds (reported as a metric).
    """

    version: str
    dim: int

    def __len__(self) -> int: ...

    def __contains__(self, image_id: str) -> bool: ...

    @property
    def nbytes(self) -> int: ...

    def upsert(self, image_id: str, vector: np.ndarray, label: int | None) -> None:
        """Add the vector of `image_id`, or replace it (re-delivery), with its label."""
        ...

    def ids(self) -> list[str]:
        """The ids held, in insertion order."""
        ...

    def remove(self, image_id: str) -> bool:
        """Drop the vector of `image_id` (the owner retired it); False if it was not held.
        The others keep their relative order (ties stay in insertion order)."""
        ...

    def search(self, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, squared distances, labels with -1 for none) of the k nearest, nearest first."""
        ...


@dataclass(frozen=True)
class _View:
    """An immutable snapshot readers use; writers publish a new one."""

    columns: np.ndarray  # (dim, capacity) float32; columns [:, :n] are valid
    labels: np.ndarray  # (capacity,) int64, -1 = unlabelled
    ids: list[str]  # append-only, shared by successive views; entries [:n] are valid
    n: int


class ExactVectorIndex:
    """Exact top-k by squared Euclidean distance; ties keep insertion order (stable).

    Parameters
    ----------
    version
        The model version the vectors belong to.
    dim
        Dimension of the vectors.
    capacity
        Rows allocated up front (doubled whenever full).
    """

    def __init__(self, version: str, dim: int, capacity: int = 1024) -> None:
        self.version = version
        self.dim = dim
        self._row_of: dict[str, int] = {}
        self._lock = threading.Lock()
        capacity = max(capacity, 1)
        self._view = _View(
            np.zeros((dim, capacity), np.float32), np.full(capacity, -1, np.int64), [], 0
        )

    def __len__(self) -> int:
        return self._view.n

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._row_of

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the matrix and labels (capacity, not only the rows in use)."""
        view = self._view
        return view.columns.nbytes + view.labels.nbytes

    def ids(self) -> list[str]:
        view = self._view
        return view.ids[: view.n]

    @property
    def capacity(self) -> int:
        return self._view.columns.shape[1]

    def upsert(self, image_id: str, vector: np.ndarray, label: int | None) -> None:
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dim,):
            raise ValueError(
                f"vector has {vector.shape[0]} dims, index {self.version} has {self.dim}"
            )
        label_value = -1 if label is None else int(label)
        with self._lock:
            view = self._view
            row = self._row_of.get(image_id)
            if row is not None:
                # Re-delivery of a known image: tasks are deterministic, so normally identical.
                if view.labels[row] == label_value and np.array_equal(view.columns[:, row], vector):
                    return
                # Published views hold this row: change a copy, never the row readers see.
                columns, labels = view.columns.copy(), view.labels.copy()
                columns[:, row] = vector
                labels[row] = label_value
                self._view = _View(columns, labels, view.ids, view.n)
                return
            columns, labels, n = view.columns, view.labels, view.n
            if n == columns.shape[1]:
                grown = np.zeros((self.dim, 2 * n), np.float32)
                grown[:, :n] = columns[:, :n]
                grown_labels = np.full(2 * n, -1, np.int64)
                grown_labels[:n] = labels[:n]
                columns, labels = grown, grown_labels
            # Row n is beyond every published view's n: writing it is invisible to readers.
            columns[:, n] = vector
            labels[n] = label_value
            view.ids.append(image_id)
            self._row_of[image_id] = n
            self._view = _View(columns, labels, view.ids, n + 1)

    def remove(self, image_id: str) -> bool:
        with self._lock:
            row = self._row_of.get(image_id)
            if row is None:
                return False
            view = self._view
            # Rare (a retired image): a new view without the row, never a change readers see.
            keep = np.r_[0:row, row + 1 : view.n]
            capacity = view.columns.shape[1]
            columns = np.zeros((self.dim, capacity), np.float32)
            columns[:, : view.n - 1] = view.columns[:, keep]
            labels = np.full(capacity, -1, np.int64)
            labels[: view.n - 1] = view.labels[keep]
            ids = [view.ids[i] for i in keep]
            self._row_of = {image_id: i for i, image_id in enumerate(ids)}
            self._view = _View(columns, labels, ids, view.n - 1)
            return True

    def search(self, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, squared distances, labels) of the k nearest vectors, nearest first."""
        view = self._view
        if view.n == 0 or k < 1:
            return [], np.empty(0, np.float32), np.empty(0, np.int64)
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if query.shape != (self.dim,):
            raise ValueError(f"query has {query.shape[0]} dims, index has {self.dim}")
        rows, distances = _top_k(view.columns, view.n, query, min(k, view.n))
        ids = view.ids
        return [ids[row] for row in rows], distances, view.labels[rows]
