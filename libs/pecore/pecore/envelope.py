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
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pecore.cipher import IntensityRescale, Scheme, decrypt, encrypt, to_uint8
from pecore.keys import (
    ImageKey,
    MasterKey,
    derive_image_key,
    derive_image_key_and_stream,
    paper_key_stream,
)

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


# --------------------------------------------------------------------------- the paper's key modes
#: Old spellings of key modes, accepted on input (CLI options, results files written before
#: the rename) and mapped to the one spelling written now.
KEY_MODE_ALIASES: dict[str, str] = {"different": "per-image"}


def canonical_key_mode(key_mode: str) -> str:
    """`key_mode` in the spelling of `KEY_MODES` ("different" → "per-image").

    Raises
    ------
    ValueError
        If `key_mode` is neither a key mode nor an alias of one.
    """
    mode = KEY_MODE_ALIASES.get(key_mode, key_mode)
    if mode not in KEY_MODES:
        raise ValueError(f"unknown key mode {key_mode!r}; expected one of {', '.join(KEY_MODES)}")
    return mode


def scenario_key_stream(
    key_mode: str, *, master: MasterKey | None, image_id: str, n_pixels: int
) -> np.ndarray:
    """The key stream of one image in the paper's two scenarios (experiment, security report).

    Parameters
    ----------
    key_mode : str
        "same": the paper's published key θ* (`pecore.keys.PAPER_KEY`) for every image — *not*
        the master-derived shared key of `image_key_for`'s "same" mode;
        "per-image" (alias "different"): ``derive_image_key(master, image_id, n_pixels)``.
    master : MasterKey or None
        The owner's master key; only "per-image" needs it.
    image_id : str
        What the per-image key is derived from.
    n_pixels : int
        Pixels of the image.

    Returns
    -------
    numpy.ndarray
        uint8 key stream of `n_pixels` values ("same": the cached, read-only paper stream).
    """
    if canonical_key_mode(key_mode) == "same":
        return paper_key_stream(n_pixels)
    if master is None:
        raise ValueError("per-image keys are derived from a master key; got master=None")
    return derive_image_key_and_stream(master, image_id, n_pixels)[1]


def encrypt_stack(
    images: np.ndarray,
    *,
    image_ids: Sequence[str],
    schemes: Sequence[str],
    key_mode: str,
    master: MasterKey | None,
    masks: np.ndarray | None = None,
    dilate: int | None = None,
    batch: int = 32,
    n_threads: int = 2,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Encrypt a stack of images under every scheme in `schemes`, one image at a time.

    Each image's key stream (`scenario_key_stream`) is made once for all schemes.  Per-image
    keys are derived `batch` images at a time on `n_threads` threads (the derivation validates
    each stream in numba code that releases the GIL).  A tile-scrambled scheme ("<inner>-bs<b>")
    uses the image id as its nonce and moves the image's ROI mask with its tiles
    (`scramble_mask`); with `dilate`, the mask is dilated by that radius first (the owner ships
    the ROI itself).

    Parameters
    ----------
    images : array (N, H, W) uint8
        Plain images.
    image_ids : sequence of str
        Per image: the per-image key's derivation input and the variants' nonce.
    schemes : sequence of str
        Schemes of `pecore.cipher` and tile-scrambled variants.
    key_mode : str
        "same" (paper key θ*) or "per-image" (alias "different"); see `scenario_key_stream`.
    master : MasterKey or None
        The master key of "per-image" mode.
    masks : array (N, H, W) bool, optional
        Tumour masks; required when `schemes` holds a tile-scrambled variant.
    dilate : int, optional
        Dilate each mask by this radius before scrambling it.
    batch, n_threads : int
        Images per key-derivation batch, and threads deriving them.

    Yields
    ------
    tuple of (dict of str to numpy.ndarray, dict of str to numpy.ndarray)
        In image order: cipher image by scheme, and the moved mask by variant scheme.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pecore.cipher_variants import encrypt_any, is_variant_scheme, scramble_mask
    from pecore.roi import dilate_mask

    variants = [s for s in schemes if is_variant_scheme(s)]
    if variants and masks is None:
        raise ValueError(f"{', '.join(variants)} need the ROI masks to scramble (masks=...)")
    key_mode = canonical_key_mode(key_mode)

    def stream_of(row: int) -> np.ndarray:
        return scenario_key_stream(
            key_mode, master=master, image_id=image_ids[row], n_pixels=images[row].size
        )

    with ThreadPoolExecutor(n_threads) as pool:
        for start in range(0, len(images), batch):
            rows = range(start, min(start + batch, len(images)))
            for row, stream in zip(rows, pool.map(stream_of, rows), strict=True):
                image = np.ascontiguousarray(images[row])
                nonce = image_ids[row]
                ciphers = {s: encrypt_any(image, stream, s, nonce) for s in schemes}
                moved = {}
                for scheme in variants:
                    roi = np.asarray(masks[row], dtype=bool)
                    if dilate is not None:
                        roi = dilate_mask(roi, dilate)
                    moved[scheme] = scramble_mask(roi, stream, scheme, nonce=nonce)
                yield ciphers, moved
