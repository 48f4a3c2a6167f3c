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
    "read_current_version",
    "read_retired",
    "write_current_version",
    "write_failure",
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


def write_failure(store: ObjectStore, key: str, reason: str, **extra: object) -> None:
    body = {"reason": reason, "at": time.time(), **extra}
    store.put(key, json.dumps(body, default=str).encode(), "application/json")


def read_retired(store: ObjectStore, layout: CollectionLayout) -> frozenset[str]:
    """Ids of the images the owner retired from the collection (one listing of the store)."""
    ids = (layout.image_id_of_retired(key) for key in store.list(layout.retired_prefix))
    return frozenset(image_id for image_id in ids if image_id)
