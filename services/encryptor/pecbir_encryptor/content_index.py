"""The hospital's keyed index of what it stored: content digest → (collection, cloud image id).

A query pixel-identical to one of the hospital's stored images must not reach the cloud as a
second cipher of that image (issue 12: "the cloud never receives two different ciphers of one
image").  Every upload writes here, at the hospital and durably, a keyed digest of its pixels
and mask; a query whose digest is found is searched *by reference* to the stored image
(`GatewayClient.search_stored`: the cloud ranks with the vector it already holds), so the cloud
receives nothing new.

Each entry is a small JSON file named by ``HMAC-SHA256(index key, collection ‖ dtype ‖ shape ‖
pixels ‖ packed mask)``.  The index key is derived from a master key; lookups try every key of
the keyring (newest first), so entries written before a rotation keep being found.  The file
name is a keyed digest, so the directory shows nothing of the images to whoever reads it
without the key; its content names a cloud id and an opaque id only.  Files are written to a
temporary name, fsync'ed, then renamed (a crash leaves the old entry or the new one).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pecore.keys import MasterKey

__all__ = ["ContentIndex", "StoredRef"]

_DOMAIN = b"pecbir/content-index/v1\x00"


@dataclass(frozen=True)
class StoredRef:
    """A stored image of this hospital: where it is in the cloud, and what the cloud's record
    says of it (`cloud_label`: the label the cloud reads, None unless a template)."""

    collection: str
    image_id: str
    opaque_id: str
    role: str = "template"
    cloud_label: int | None = None


def _index_key(master: MasterKey) -> bytes:
    return hmac.new(master.secret.get_secret_value(), _DOMAIN, hashlib.sha256).digest()


def content_digest(master: MasterKey, collection: str, pixels: np.ndarray, mask: np.ndarray) -> str:
    """Keyed digest of (collection, pixels exactly as given, binary mask)."""
    pixels = np.ascontiguousarray(pixels)
    digest = hmac.new(_index_key(master), digestmod=hashlib.sha256)
    digest.update(collection.encode() + b"\x00")
    digest.update(f"{pixels.dtype.str}:{pixels.shape}\x00".encode())
    digest.update(pixels.tobytes())
    digest.update(np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes())
    return digest.hexdigest()


class ContentIndex:
    """The directory of entries (None: no index; every query goes the normal way).

    Parameters
    ----------
    directory
        Where the entries live (a volume of the hospital's, like the pending store).
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    def add(
        self,
        master: MasterKey,
        ref: StoredRef,
        pixels: np.ndarray,
        mask: np.ndarray,
    ) -> None:
        """Record that `pixels` + `mask` are stored as `ref` (replaces an older entry)."""
        if self.directory is None:
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = content_digest(master, ref.collection, pixels, mask)
        body = json.dumps(
            {
                "collection": ref.collection,
                "image_id": ref.image_id,
                "opaque_id": ref.opaque_id,
                "role": ref.role,
                "cloud_label": ref.cloud_label,
            }
        ).encode()
        path = self.directory / f"{name}.json"
        staged = self.directory / f".{name}.{os.getpid()}.new"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staged, path)

    def find(
        self,
        masters: Iterable[MasterKey],
        collection: str,
        pixels: np.ndarray,
        mask: np.ndarray,
    ) -> StoredRef | None:
        """The stored image whose pixels and mask are exactly these, in `collection`; or None."""
        if self.directory is None or not self.directory.is_dir():
            return None
        for master in masters:
            path = self.directory / f"{content_digest(master, collection, pixels, mask)}.json"
            try:
                entry = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                continue  # a damaged entry: the query goes the normal way
            if entry.get("collection") == collection:
                return StoredRef(
                    entry["collection"],
                    entry["image_id"],
                    entry["opaque_id"],
                    entry.get("role", "template"),
                    entry.get("cloud_label"),
                )
        return None
