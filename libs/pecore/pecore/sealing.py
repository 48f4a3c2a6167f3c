"""Owner-side sealing: an image and its mask under AES-256-GCM, in one self-describing blob.

The `sealed` protection mode hides every pixel from the cloud (the `pe` mode's perceptual
cipher leaves about half of them in the clear).  Envelope encryption, as key-management
systems do it:

* a fresh random 256-bit **data key** per image encrypts the payload (image, mask, the
  owner's private metadata such as a non-template label) with AES-256-GCM;
* the data key is **wrapped** (AES-256-GCM again) by a key-encryption key (KEK) derived from
  the owner's master key with HKDF-SHA256 under its own label, so the KEK is never equal to any
  other key the master key derives (image keys, integrity tags, opaque ids);
* the **associated data** of both binds the record's identity: format version, tenant,
  collection and image id (and, for the wrap, the master key's id).  A blob moved to another
  image, collection or tenant is refused before anything is decrypted;
* **rotation** re-wraps the data key under a new master key: the payload's ciphertext is kept
  byte for byte (`rewrap`).

The data key and nonces are fresh random bytes, or (``content_bound=True``, what the encryptor
uses) derived with HKDF from the master key, the identity and the payload's SHA-256: then the
same image sealed again under the same identity is the same blob (a re-push is idempotent),
while any other content or identity gets an unrelated key, so no (key, nonce) pair ever
encrypts two different payloads.

Blob layout (all integers big-endian)::

    b"PECBSLD1" | u32 header length | header (canonical JSON) | AES-GCM ciphertext ‖ tag

The header is public (the cloud stores it as part of the blob): format, identity, the data
nonce and the wrap (key id, nonce, wrapped key).  It must be exactly the canonical encoding of
its own fields, so no byte of it can change without the blob being refused.  The payload
(inside the ciphertext) is ``u32 length | JSON description | image bytes | packed mask bits``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pecore.envelope import TamperedError
from pecore.keys import MasterKey

__all__ = [
    "SEALED_FORMAT",
    "SEALED_MAGIC",
    "SealedContents",
    "SealedHeader",
    "SealedIdentity",
    "WrappedKey",
    "open_sealed",
    "open_with_data_key",
    "read_header",
    "rewrap",
    "seal_image",
    "unwrap_data_key",
]

SEALED_FORMAT: Final = "pecbir-sealed/v1"
SEALED_MAGIC: Final = b"PECBSLD1"
# HKDF info of the key-encryption key, and the prefixes of the two AEADs' associated data:
# each use of the master key has its own label (domain separation).
_KEK_INFO: Final = b"pecbir/sealed/kek/v1"
_CONTENT_KEY_INFO: Final = b"pecbir/sealed/content-key/v1\x00"
_DATA_AAD: Final = b"pecbir/sealed/data/v1\x00"
_WRAP_AAD: Final = b"pecbir/sealed/wrap/v1\x00"
_KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 12
# Largest header a reader accepts (a real one is ~400 bytes): bounds what a bad blob costs.
_MAX_HEADER: Final = 4096
_HEX_NONCE = r"^[0-9a-f]{24}$"


class SealedIdentity(BaseModel):
    """What a sealed blob is bound to: the owner's tenant, the collection and the image id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str = Field(min_length=1, max_length=63)
    collection: str = Field(min_length=1, max_length=63)
    image_id: str = Field(min_length=1, max_length=128)


class WrappedKey(BaseModel):
    """The data key, encrypted under the KEK of master key `key_id`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    nonce: str = Field(pattern=_HEX_NONCE)
    wrapped: str = Field(pattern=r"^[0-9a-f]{96}$")  # 32-byte key + 16-byte GCM tag


class SealedHeader(BaseModel):
    """The public header of a sealed blob."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = SEALED_FORMAT
    identity: SealedIdentity
    nonce: str = Field(pattern=_HEX_NONCE)
    wrap: WrappedKey


@dataclass(frozen=True)
class SealedContents:
    """What a sealed blob holds: the image (bit-exact), its mask and the owner's metadata."""

    image: np.ndarray
    mask: np.ndarray | None
    metadata: dict[str, object]


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _aesgcm(key: bytes):  # -> cryptography's AESGCM
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _kek(master: MasterKey) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=_KEK_INFO).derive(
        master.secret.get_secret_value()
    )


def _data_aad(identity: SealedIdentity) -> bytes:
    return _DATA_AAD + _canonical({"format": SEALED_FORMAT, **identity.model_dump()})


def _wrap_aad(identity: SealedIdentity, key_id: str) -> bytes:
    return _WRAP_AAD + _canonical(
        {"format": SEALED_FORMAT, "key_id": key_id, **identity.model_dump()}
    )


def _content_keys(
    master: MasterKey, identity: SealedIdentity, payload: bytes
) -> tuple[bytes, bytes, bytes]:
    """(data key, nonce, wrap nonce) derived from master key, identity and payload digest."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = _CONTENT_KEY_INFO + _canonical(
        {"format": SEALED_FORMAT, "payload_sha256": _sha256(payload), **identity.model_dump()}
    )
    length = _KEY_BYTES + 2 * _NONCE_BYTES
    derived = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(
        master.secret.get_secret_value()
    )
    return derived[:_KEY_BYTES], derived[_KEY_BYTES:-_NONCE_BYTES], derived[-_NONCE_BYTES:]


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _random(n: int) -> bytes:
    import secrets

    return secrets.token_bytes(n)


def _wrap(
    data_key: bytes, master: MasterKey, identity: SealedIdentity, nonce: bytes | None
) -> WrappedKey:
    nonce = nonce if nonce is not None else _random(_NONCE_BYTES)
    wrapped = _aesgcm(_kek(master)).encrypt(nonce, data_key, _wrap_aad(identity, master.key_id))
    return WrappedKey(key_id=master.key_id, nonce=nonce.hex(), wrapped=wrapped.hex())


def _pack(header: SealedHeader, ciphertext: bytes) -> bytes:
    encoded = _canonical(header.model_dump(mode="json"))
    return SEALED_MAGIC + struct.pack(">I", len(encoded)) + encoded + ciphertext


def _split(blob: bytes) -> tuple[SealedHeader, bytes]:
    blob = bytes(blob)
    start = len(SEALED_MAGIC) + 4
    if len(blob) < start or not blob.startswith(SEALED_MAGIC):
        raise TamperedError("not a sealed blob (bad magic)")
    (length,) = struct.unpack(">I", blob[len(SEALED_MAGIC) : start])
    if length > _MAX_HEADER or start + length > len(blob):
        raise TamperedError("sealed blob header length is out of range")
    encoded = blob[start : start + length]
    try:
        header = SealedHeader.model_validate_json(encoded)
    except ValueError:
        raise TamperedError("sealed blob header is unreadable") from None
    # Only the canonical encoding is valid: no byte of the header can change unnoticed.
    if header.format != SEALED_FORMAT or _canonical(header.model_dump(mode="json")) != encoded:
        raise TamperedError("sealed blob header is not in canonical form")
    return header, blob[start + length :]


def read_header(blob: bytes) -> SealedHeader:
    """The public header of `blob` (TamperedError if the blob is not well formed)."""
    return _split(blob)[0]


def _check_identity(header: SealedHeader, expected: SealedIdentity) -> None:
    if header.identity != expected:
        got, want = header.identity, expected
        raise TamperedError(
            f"sealed record belongs to {got.tenant}/{got.collection}/{got.image_id}, "
            f"not to {want.tenant}/{want.collection}/{want.image_id}; refusing to open it"
        )


def _payload(image: np.ndarray, mask: np.ndarray | None, metadata: Mapping[str, object]) -> bytes:
    image = np.ascontiguousarray(image)
    if image.ndim != 2 or image.dtype.kind not in "uif" or image.dtype.itemsize > 8:
        raise ValueError(f"can seal 2-D numeric images only, got {image.dtype} {image.shape}")
    description: dict[str, object] = {
        "image": {"dtype": image.dtype.str, "shape": list(image.shape)},
        "mask": None,
        "metadata": dict(metadata),
    }
    parts = [image.tobytes()]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the image shape {image.shape}")
        description["mask"] = {"shape": list(mask.shape)}
        parts.append(np.packbits(mask, axis=None).tobytes())
    encoded = _canonical(description)
    return struct.pack(">I", len(encoded)) + encoded + b"".join(parts)


def _unpack_payload(payload: bytes) -> SealedContents:
    # Authenticated by the AEAD: malformed content here means a bug of the writer, not tamper.
    (length,) = struct.unpack(">I", payload[:4])
    description = json.loads(payload[4 : 4 + length])
    rest = payload[4 + length :]
    dtype = np.dtype(description["image"]["dtype"])
    shape = tuple(description["image"]["shape"])
    n_image = int(np.prod(shape)) * dtype.itemsize
    image = np.frombuffer(rest[:n_image], dtype=dtype).reshape(shape).copy()
    mask = None
    if description["mask"] is not None:
        mask_shape = tuple(description["mask"]["shape"])
        bits = np.frombuffer(rest[n_image:], dtype=np.uint8)
        mask = np.unpackbits(bits, count=int(np.prod(mask_shape))).reshape(mask_shape).astype(bool)
    return SealedContents(image=image, mask=mask, metadata=description["metadata"])


def seal_image(
    image: np.ndarray,
    mask: np.ndarray | None,
    master: MasterKey,
    identity: SealedIdentity,
    *,
    metadata: Mapping[str, object] | None = None,
    content_bound: bool = False,
    data_key: bytes | None = None,
    nonce: bytes | None = None,
    wrap_nonce: bytes | None = None,
) -> bytes:
    """Seal `image` (bit-exact, any integer or float dtype) and `mask` for the cloud.

    Parameters
    ----------
    image : numpy.ndarray
        The plain 2-D image, as the owner holds it.
    mask : numpy.ndarray or None
        Its tumour mask (sealed too), None for none.
    master : MasterKey
        The owner's master key; the data key is wrapped under a KEK derived from it.
    identity : SealedIdentity
        Tenant, collection and image id the blob is bound to (associated data).
    metadata : mapping, optional
        The owner's private JSON metadata (e.g. a label the cloud must not read).
    content_bound : bool, default=False
        Derive data key and nonces from the master key, the identity and the payload (see the
        module docstring) instead of drawing them at random.
    data_key, nonce, wrap_nonce : bytes, optional
        Fixed values for known-answer tests only; by default fresh random ones (32, 12 and 12
        bytes).  Never reuse a (data key, nonce) pair for two payloads.

    Returns
    -------
    bytes
        The sealed blob.
    """
    payload = _payload(image, mask, metadata or {})
    if content_bound:
        data_key, nonce, wrap_nonce = _content_keys(master, identity, payload)
    data_key = data_key if data_key is not None else _random(_KEY_BYTES)
    nonce = nonce if nonce is not None else _random(_NONCE_BYTES)
    if len(data_key) != _KEY_BYTES or len(nonce) != _NONCE_BYTES:
        raise ValueError("a data key has 32 bytes and a nonce 12")
    ciphertext = _aesgcm(data_key).encrypt(nonce, payload, _data_aad(identity))
    header = SealedHeader(
        identity=identity, nonce=nonce.hex(), wrap=_wrap(data_key, master, identity, wrap_nonce)
    )
    return _pack(header, ciphertext)


def _decrypt(header: SealedHeader, ciphertext: bytes, data_key: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return _aesgcm(data_key).decrypt(
            bytes.fromhex(header.nonce), ciphertext, _data_aad(header.identity)
        )
    except InvalidTag:
        raise TamperedError(
            f"sealed image {header.identity.image_id!r} failed authentication: it changed "
            "since the owner sealed it (or the key is wrong); refusing to open it"
        ) from None


def _unwrap(header: SealedHeader, master: MasterKey) -> bytes:
    from cryptography.exceptions import InvalidTag

    wrap = header.wrap
    if wrap.key_id != master.key_id:
        raise TamperedError(
            f"sealed image {header.identity.image_id!r} is wrapped under master key "
            f"{wrap.key_id}, not {master.key_id}"
        )
    try:
        return _aesgcm(_kek(master)).decrypt(
            bytes.fromhex(wrap.nonce),
            bytes.fromhex(wrap.wrapped),
            _wrap_aad(header.identity, wrap.key_id),
        )
    except InvalidTag:
        raise TamperedError(
            f"the wrapped data key of sealed image {header.identity.image_id!r} failed "
            "authentication; refusing to open it"
        ) from None


def unwrap_data_key(blob: bytes, master: MasterKey, expected: SealedIdentity) -> bytes:
    """The data key of `blob`, after its identity, wrap and payload all authenticated.

    Raises
    ------
    TamperedError
        The blob belongs to another identity, another master key, or any byte changed.
    """
    header, ciphertext = _split(blob)
    _check_identity(header, expected)
    data_key = _unwrap(header, master)
    _decrypt(header, ciphertext, data_key)  # authenticate before the key leaves
    return data_key


def open_with_data_key(blob: bytes, data_key: bytes, expected: SealedIdentity) -> SealedContents:
    """Open `blob` with its data key (as a key release hands it out)."""
    header, ciphertext = _split(blob)
    _check_identity(header, expected)
    return _unpack_payload(_decrypt(header, ciphertext, data_key))


def open_sealed(blob: bytes, master: MasterKey, expected: SealedIdentity) -> SealedContents:
    """Check and open a sealed blob: image, mask and metadata exactly as sealed.

    Parameters
    ----------
    blob : bytes
        As the cloud returned it.
    master : MasterKey
        The master key its wrap names (see `read_header`).
    expected : SealedIdentity
        The tenant, collection and image id the caller asked for.

    Returns
    -------
    SealedContents
        Bit-exact image, mask (or None) and the owner's metadata.

    Raises
    ------
    TamperedError
        Another identity, another master key, or any byte changed: nothing is returned.
    """
    header, ciphertext = _split(blob)
    _check_identity(header, expected)
    return _unpack_payload(_decrypt(header, ciphertext, _unwrap(header, master)))


def rewrap(
    blob: bytes,
    old: MasterKey,
    new: MasterKey,
    expected: SealedIdentity,
    *,
    wrap_nonce: bytes | None = None,
) -> bytes:
    """`blob` with its data key wrapped under `new` instead of `old`; the payload is untouched.

    The payload is authenticated first, so a rotation never re-wraps a tampered blob.
    """
    header, ciphertext = _split(blob)
    data_key = unwrap_data_key(blob, old, expected)
    fresh = header.model_copy(update={"wrap": _wrap(data_key, new, header.identity, wrap_nonce)})
    return _pack(fresh, ciphertext)
