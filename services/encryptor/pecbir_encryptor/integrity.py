"""The owner's integrity tag: HMAC-SHA256 over cipher pixels, mask and metadata.

Made at upload time with a key derived from the master key, checked before any decryption:
the cloud can neither forge nor silently alter what it stores.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import numpy as np

from pecbir_contracts.schemas import ImageMetadata, Integrity
from pecore.keys import MasterKey

_LABEL = b"pecbir/integrity/v1"


class IntegrityError(ValueError):
    """A stored object does not match the owner's tag: refuse to decrypt it."""


def integrity_key(master: MasterKey) -> bytes:
    return hmac.new(master.secret.get_secret_value(), _LABEL, hashlib.sha256).digest()


def _digest(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    header = f"{array.dtype.str}:{array.shape}".encode()
    return hashlib.sha256(header + b"\x00" + array.tobytes()).digest()


def compute_tag(
    master: MasterKey, cipher: np.ndarray, mask: np.ndarray, meta: ImageMetadata
) -> str:
    canonical = json.dumps(meta.signed_part(), sort_keys=True, separators=(",", ":")).encode()
    message = b"".join(
        [_LABEL, _digest(cipher.astype(np.uint8)), _digest(mask.astype(bool)), canonical]
    )
    return hmac.new(integrity_key(master), message, hashlib.sha256).hexdigest()


def sign(
    master: MasterKey, cipher: np.ndarray, mask: np.ndarray, meta: ImageMetadata
) -> ImageMetadata:
    tag = compute_tag(master, cipher, mask, meta)
    return meta.model_copy(update={"integrity": Integrity(key_id=master.key_id, tag=tag)})


def verify(master: MasterKey, cipher: np.ndarray, mask: np.ndarray, meta: ImageMetadata) -> None:
    if meta.integrity is None:
        raise IntegrityError(f"image {meta.opaque_id} carries no integrity tag")
    if meta.integrity.key_id != master.key_id:
        raise IntegrityError(
            f"image {meta.opaque_id} was tagged under key {meta.integrity.key_id}, "
            f"this service holds {master.key_id}"
        )
    expected = compute_tag(master, cipher, mask, meta)
    if not hmac.compare_digest(expected, meta.integrity.tag):
        raise IntegrityError(
            f"integrity check failed for image {meta.opaque_id}: cipher, mask or metadata were "
            "altered since upload; refusing to decrypt"
        )
