"""Small stored records written by one service and read by another (formats in one place)."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np

from pecbir_contracts.layout import CollectionLayout, check_version, version_number
from pecbir_contracts.store import ObjectNotFound, ObjectStore

__all__ = [
    "FeatureRecord",
    "FeatureSnapshot",
    "live_versions",
    "read_current_version",
    "read_indexed_version",
    "read_retired",
    "read_version_failures",
    "write_current_version",
    "write_failure",
    "write_indexed_version",
]


@dataclass(frozen=True)
class FeatureRecord:
    """One image's features under one model version (features/<version>/<image_id>.npz).

    The projected vector only: the Fisher vector it came from (F = 2·D·d·R floats, 332 KB at
    D = 64 on cipher images) is never read back (training recomputes it under the version's
    patch model; a sealed image's owner-sent vector is stored beside its blob), so it is not
    written. Records of earlier releases that hold one still load.
    """

    version: str
    vector: np.ndarray  # float32 (dim,), projected by the learned metric
    label: int | None

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            version=np.array(self.version),
            vector=np.asarray(self.vector, dtype=np.float32),
            label=np.array(-1 if self.label is None else self.label, dtype=np.int64),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureRecord:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            label = int(arrays["label"])
            return cls(
                version=str(arrays["version"]),
                vector=arrays["vector"].astype(np.float32),
                label=None if label < 0 else label,
            )


@dataclass(frozen=True)
class FeatureSnapshot:
    """Many feature records of one version in one object (``snapshots/<version>.npz``).

    Written by the indexer's reconciler from the records (`FeatureRecord`), read by the
    search service at start-up instead of one GET per record; the records stay the truth (a
    record the snapshot lacks is read on its own). A record never changes once written, so
    an older snapshot is never wrong, only short.
    """

    version: str
    ids: list[str]
    vectors: np.ndarray  # float32 (n, dim)
    labels: np.ndarray  # int64 (n,), -1 = unlabelled

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.ids) != self.vectors.shape[0]:
            raise ValueError("a snapshot needs one vector row per id")
        if self.labels.shape != (len(self.ids),):
            raise ValueError("a snapshot needs one label per id")

    @classmethod
    def of(cls, version: str, records: dict[str, FeatureRecord], dim: int) -> FeatureSnapshot:
        """The snapshot of `records` (image id → record), in id order."""
        ids = sorted(records)
        vectors = np.zeros((len(ids), dim), np.float32)
        labels = np.full(len(ids), -1, np.int64)
        for row, image_id in enumerate(ids):
            record = records[image_id]
            vectors[row] = record.vector
            labels[row] = -1 if record.label is None else record.label
        return cls(version, ids, vectors, labels)

    def records(self) -> dict[str, FeatureRecord]:
        """Image id → its record."""
        return {
            image_id: FeatureRecord(
                self.version,
                self.vectors[row],
                None if self.labels[row] < 0 else int(self.labels[row]),
            )
            for row, image_id in enumerate(self.ids)
        }

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            version=np.array(self.version),
            ids=np.array(self.ids, dtype="S32"),
            vectors=np.asarray(self.vectors, dtype=np.float32),
            labels=np.asarray(self.labels, dtype=np.int64),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureSnapshot:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(
                version=str(arrays["version"]),
                ids=[raw.decode("ascii") for raw in arrays["ids"].tolist()],
                vectors=arrays["vectors"].astype(np.float32),
                labels=arrays["labels"].astype(np.int64),
            )


def read_current_version(store: ObjectStore, layout: CollectionLayout) -> str | None:
    """The model version new images of the collection are indexed with (None before training)."""
    try:
        return check_version(json.loads(store.get(layout.current_model))["version"])
    except ObjectNotFound:
        return None


def write_current_version(store: ObjectStore, layout: CollectionLayout, version: str) -> bool:
    """Point the collection at `version` unless a newer one is already current."""
    current = read_current_version(store, layout)
    if current is not None and version_number(current) >= version_number(version):
        return False
    body = {"version": check_version(version), "updated_at": time.time()}
    store.put(layout.current_model, json.dumps(body).encode(), "application/json")
    return True


def read_indexed_version(store: ObjectStore, layout: CollectionLayout) -> str | None:
    """The newest version whose features cover every image of the collection (None: unknown)."""
    try:
        return check_version(json.loads(store.get(layout.indexed_model))["version"])
    except ObjectNotFound:
        return None


def write_indexed_version(store: ObjectStore, layout: CollectionLayout, version: str) -> bool:
    """Record that `version`'s re-index finished, unless a newer one is recorded already."""
    indexed = read_indexed_version(store, layout)
    if indexed is not None and version_number(indexed) >= version_number(version):
        return False
    body = {"version": check_version(version), "updated_at": time.time()}
    store.put(layout.indexed_model, json.dumps(body).encode(), "application/json")
    return True


def live_versions(store: ObjectStore, layout: CollectionLayout) -> list[str]:
    """Every version a search service may serve now, oldest first: what a new image is indexed
    with so that it is searchable whichever of them is served (issue 15).

    The search service serves the newest version whose re-index finished (`indexed.json`)
    until a newer one holds every image it holds, then swaps. While a new version is being
    trained or re-indexed, a new image is therefore indexed with the indexed version *and*
    every trained version after it up to the current one: searchable at once under the
    serving version, and present in the new one at the swap. Without an `indexed.json`
    (a store of an earlier release), the trained version before the current one stands in.
    Empty before the first model.
    """
    current = read_current_version(store, layout)
    if current is None:
        return []
    trained = {
        version
        for key in store.list(layout.models_prefix)
        if (version := layout.version_of_manifest_key(key)) is not None
    }
    trained.add(current)
    newest = version_number(current)
    indexed = read_indexed_version(store, layout)
    if indexed is None:
        older = [v for v in trained if version_number(v) < newest]
        floor = max(version_number(v) for v in older) if older else newest
    else:
        floor = min(version_number(indexed), newest)
    return sorted((v for v in trained if floor <= version_number(v) <= newest), key=version_number)


def write_failure(store: ObjectStore, key: str, reason: str, **extra: object) -> None:
    body = {"reason": reason, "at": time.time(), **extra}
    store.put(key, json.dumps(body, default=str).encode(), "application/json")


def read_version_failures(
    store: ObjectStore, layout: CollectionLayout, version: str
) -> frozenset[str]:
    """Ids of the images whose indexing with `version` gave up (one listing of the store)."""
    ids = (
        layout.image_id_of_version_failure(version, key)
        for key in store.list(layout.version_failures_prefix(version))
    )
    return frozenset(image_id for image_id in ids if image_id)


def read_retired(store: ObjectStore, layout: CollectionLayout) -> frozenset[str]:
    """Ids of the images the owner retired from the collection (one listing of the store)."""
    ids = (layout.image_id_of_retired(key) for key in store.list(layout.retired_prefix))
    return frozenset(image_id for image_id in ids if image_id)
