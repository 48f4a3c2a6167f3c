"""Owner-side encryption of one image: 8-bit rule + key derivation + cipher + metadata.

`seal` turns a plain 2-D image (any integer or float depth) into a uint8 cipher image and a
`CipherMetadata` record that can travel with it: it names the scheme, the key mode, the
master key's public fingerprint and the key's check value, and the 8-bit conversion rule,
but holds no key material and nothing from a DICOM header.  `unseal` re-derives the key from
the master key and inverts it bit-exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pecore.cipher import IntensityRescale, Scheme, decrypt, encrypt, to_uint8
from pecore.keys import ImageKey, MasterKey, derive_image_key

KeyMode = Literal["same", "per-image"]
KEY_MODES: tuple[str, ...] = ("same", "per-image")
# In "same" mode every image of the owner uses the key derived under this label
# (one key stream per image size), as in the paper's k_i = k_j scenario.
SHARED_KEY_LABEL = "__shared__"


class CipherMetadata(BaseModel):
    """Everything a key holder needs, besides the master key, to decrypt a cipher image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["pecbir-cipher-v1"] = "pecbir-cipher-v1"
    image_id: str = Field(min_length=1, max_length=128)
    scheme: Scheme
    key_mode: KeyMode
    key_id: str
    key_counter: int = Field(ge=0)
    key_check: str
    shape: tuple[int, int]
    rescale: IntensityRescale
    # Owner's HMAC over the cipher pixels and every other field (see `integrity_tag`); set by
    # `tag`, checked by `verify_tag` before anything is decrypted.
    integrity_tag: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


def image_key_for(master: MasterKey, image_id: str, key_mode: KeyMode, n_pixels: int) -> ImageKey:
    if key_mode not in KEY_MODES:
        raise ValueError(f"unknown key mode {key_mode!r}; expected one of {', '.join(KEY_MODES)}")
    label = SHARED_KEY_LABEL if key_mode == "same" else image_id
    return derive_image_key(master, label, n_pixels)


def seal(
    image: np.ndarray,
    master: MasterKey,
    image_id: str,
    scheme: Scheme = "ours",
    key_mode: KeyMode = "per-image",
) -> tuple[np.ndarray, CipherMetadata]:
    """Encrypt a plain image for the cloud; returns (uint8 cipher image, metadata)."""
    plain, rescale = to_uint8(image)
    key = image_key_for(master, image_id, key_mode, plain.size)
    cipher = encrypt(plain, key.stream(), scheme)
    metadata = CipherMetadata(
        image_id=image_id,
        scheme=scheme,
        key_mode=key_mode,
        key_id=master.key_id,
        key_counter=key.counter,
        key_check=key.check,
        shape=plain.shape,
        rescale=rescale,
    )
    return cipher, metadata


_TAG_LABEL = b"pecbir/sidecar-integrity/v1"


class TamperedError(ValueError):
    """A cipher image or its metadata changed since the owner tagged them: do not decrypt."""


def integrity_tag(cipher: np.ndarray, metadata: CipherMetadata, master: MasterKey) -> str:
    """HMAC-SHA256 (key derived from the master key) over cipher pixels + metadata fields."""
    pixels = np.ascontiguousarray(cipher, dtype=np.uint8)
    fields = metadata.model_dump(mode="json", exclude={"integrity_tag"})
    message = b"\x00".join(
        [
            _TAG_LABEL,
            f"{pixels.shape}".encode(),
            hashlib.sha256(pixels.tobytes()).digest(),
            json.dumps(fields, sort_keys=True, separators=(",", ":")).encode(),
        ]
    )
    key = hmac.new(master.secret.get_secret_value(), _TAG_LABEL, hashlib.sha256).digest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def tag(cipher: np.ndarray, metadata: CipherMetadata, master: MasterKey) -> CipherMetadata:
    """`metadata` with the owner's integrity tag over it and `cipher`."""
    return metadata.model_copy(update={"integrity_tag": integrity_tag(cipher, metadata, master)})


def verify_tag(cipher: np.ndarray, metadata: CipherMetadata, master: MasterKey) -> None:
    """TamperedError unless `metadata` carries a tag that matches `cipher` and its fields."""
    if metadata.integrity_tag is None:
        raise TamperedError(
            f"image {metadata.image_id!r}: metadata carries no integrity tag; refusing to decrypt"
        )
    if metadata.key_id != master.key_id:
        raise TamperedError(
            f"image {metadata.image_id!r} was encrypted under master key {metadata.key_id}, "
            f"not {master.key_id}"
        )
    if tuple(np.shape(cipher)) != tuple(metadata.shape) or not hmac.compare_digest(
        integrity_tag(cipher, metadata, master), metadata.integrity_tag
    ):
        raise TamperedError(
            f"integrity check failed for image {metadata.image_id!r}: the cipher image or its "
            "metadata changed since encryption; refusing to decrypt"
        )


def unseal(cipher: np.ndarray, metadata: CipherMetadata, master: MasterKey) -> np.ndarray:
    """Decrypt to the exact uint8 image that `seal` encrypted."""
    if metadata.key_id != master.key_id:
        raise ValueError(
            f"image {metadata.image_id!r} was encrypted under master key {metadata.key_id}, "
            f"not {master.key_id}"
        )
    if tuple(cipher.shape) != tuple(metadata.shape):
        raise ValueError(f"cipher image has shape {cipher.shape}, metadata says {metadata.shape}")
    key = image_key_for(master, metadata.image_id, metadata.key_mode, cipher.size)
    if key.counter != metadata.key_counter or key.check != metadata.key_check:
        raise ValueError(
            f"key for image {metadata.image_id!r} does not match the stored check value: "
            "different SSLM implementation or corrupted metadata; refusing to decrypt"
        )
    return decrypt(cipher, key.stream(), metadata.scheme)
