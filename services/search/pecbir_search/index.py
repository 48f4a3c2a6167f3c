"""In-memory k-NN over projected vectors: one float32 matrix per collection and model version."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _View:
    """An immutable snapshot readers use; writers publish a new one."""

    rows: np.ndarray  # (capacity, dim) float32; rows [:n] are valid
    labels: np.ndarray  # (capacity,) int64, -1 = unlabelled
    ids: tuple[str, ...]
    n: int


class VectorIndex:
    """Exact top-k by squared Euclidean distance; ties keep insertion order (stable)."""

    def __init__(self, version: str, dim: int, capacity: int = 1024) -> None:
        self.version = version
        self.dim = dim
        self._row_of: dict[str, int] = {}
        self._lock = threading.Lock()
        self._view = _View(
            np.zeros((capacity, dim), np.float32), np.full(capacity, -1, np.int64), (), 0
        )

    def __len__(self) -> int:
        return self._view.n

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._row_of

    def upsert(self, image_id: str, vector: np.ndarray, label: int | None) -> None:
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (self.dim,):
            raise ValueError(
                f"vector has {vector.shape[0]} dims, index {self.version} has {self.dim}"
            )
        with self._lock:
            view = self._view
            row = self._row_of.get(image_id)
            if row is not None:
                # Re-delivery of a known image: same vector (tasks are deterministic).
                view.rows[row] = vector
                view.labels[row] = -1 if label is None else label
                return
            rows, labels = view.rows, view.labels
            if view.n == rows.shape[0]:
                rows = np.concatenate([rows, np.zeros_like(rows)])
                labels = np.concatenate([labels, np.full_like(labels, -1)])
            rows[view.n] = vector
            labels[view.n] = -1 if label is None else label
            self._row_of[image_id] = view.n
            self._view = _View(rows, labels, (*view.ids, image_id), view.n + 1)

    def search(self, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, squared distances, labels) of the k nearest vectors, nearest first."""
        view = self._view
        if view.n == 0:
            return [], np.empty(0, np.float32), np.empty(0, np.int64)
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        diff = view.rows[: view.n] - query
        distances = np.einsum("ij,ij->i", diff, diff)
        k = min(k, view.n)
        if k < view.n:
            # Partition first, then a stable sort of the candidates plus every tie at the border.
            border = np.partition(distances, k - 1)[k - 1]
            candidates = np.flatnonzero(distances <= border)
            order = candidates[np.argsort(distances[candidates], kind="stable")][:k]
        else:
            order = np.argsort(distances, kind="stable")
        return [view.ids[i] for i in order], distances[order], view.labels[order]
