"""Owner-side operations: protect (8-bit + encrypt + tag), upload, fetch-verify-decrypt."""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from pecbir_contracts.png import decode_image_png, decode_mask_png, encode_png
from pecbir_contracts.schemas import ImageMetadata, SearchResponse
from pecbir_encryptor.audit import AuditLog
from pecbir_encryptor.gateway_client import GatewayClient
from pecbir_encryptor.integrity import IntegrityError
from pecbir_encryptor.keyring import Keyring, UnknownKey
from pecbir_encryptor.wire import from_wire, to_wire
from pecore.envelope import CipherMetadata, image_key_for, seal, tag, unseal, verify_tag
from pecore.keys import ImageKey, MasterKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protected:
    cipher: np.ndarray
    mask: np.ndarray
    metadata: ImageMetadata


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"tumour mask must be 2-D, got shape {mask.shape}")
    if mask.shape != tuple(shape):
        raise ValueError(f"tumour mask shape {mask.shape} differs from the image shape {shape}")
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():
        raise ValueError("tumour mask contains NaN or infinite values")
    values = np.unique(mask)
    if values.size > 2 or (values.size == 2 and values[0] != 0):
        raise ValueError("tumour mask is not binary (expected 0 and one other value)")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("tumour mask is empty: the retrieval needs the tumour region")
    return mask


def protect_image(
    pixels: np.ndarray,
    mask: np.ndarray,
    *,
    master: MasterKey,
    opaque_id: str,
    scheme: str = "ours",
    key_mode: str = "per-image",
    label: int | None = None,
    role: str = "template",
) -> Protected:
    """8-bit rule + encryption with the image's key + the owner's tag; nothing identifying.

    What the encryptor uploads, and what the benchmark/soak helpers upload in its place.

    Parameters
    ----------
    pixels : numpy.ndarray
        Plain 2-D grey image (any integer or float depth).
    mask : numpy.ndarray
        Binary, non-empty tumour mask of the same shape.
    master : MasterKey
        The owner's (active) master key.
    opaque_id : str
        Pseudonym of the image in the cloud.
    scheme, key_mode : str
        Cipher scheme; "per-image" key or the shared key derived from the master key ("same").
    label : int or None
        Class label of a template (dropped for a query).
    role : {"template", "query"}
        What the cloud does with the image.

    Returns
    -------
    Protected
        Cipher image, the checked mask and the tagged `ImageMetadata`.
    """
    mask = _check_mask(mask, pixels.shape)
    cipher, record = seal(
        pixels,
        master,
        opaque_id,
        scheme,
        key_mode,
        role=role,
        label=label if role == "template" else None,
    )
    record = tag(cipher, record, master, mask=mask)
    return Protected(cipher, mask, to_wire(record))


class Encryptor:
    def __init__(
        self,
        master: MasterKey | Keyring,
        gateway: httpx.Client,
        *,
        scheme: str = "ours",
        key_mode: str = "per-image",
        audit_log: Path | None = None,
    ) -> None:
        # New uploads use the active key; stored images are opened with the key they name.
        self.keyring = master if isinstance(master, Keyring) else Keyring(master)
        self.master = self.keyring.active
        self.gateway = GatewayClient(gateway)
        self.scheme = scheme
        self.key_mode = key_mode
        self.audit = AuditLog(audit_log)
        # The id (and so the fresh key) of each search query: random. The demo sets a seeded
        # sequence so that the same command gives the same numbers (`pecbir demo`).
        self.query_ids: Callable[[], str] = lambda: uuid.uuid4().hex

    # -- ids -----------------------------------------------------------------------------------
    def opaque_id_for(self, source_uid: str | None) -> str:
        """Pseudonym of a source object: keyed hash of its UID (re-push → same id), or random."""
        if not source_uid:
            return uuid.uuid4().hex
        digest = hmac.new(
            self.master.secret.get_secret_value(),
            b"pecbir/opaque-id/v1\x00" + source_uid.encode(),
            hashlib.sha256,
        )
        return digest.hexdigest()[:32]

    # -- owner side ----------------------------------------------------------------------------
    def protect(
        self,
        pixels: np.ndarray,
        mask: np.ndarray,
        *,
        opaque_id: str,
        label: int | None = None,
        role: str = "template",
    ) -> Protected:
        """`protect_image` with this encryptor's active key, scheme and key mode."""
        return protect_image(
            pixels,
            mask,
            master=self.master,
            opaque_id=opaque_id,
            scheme=self.scheme,
            key_mode=self.key_mode,
            label=label,
            role=role,
        )

    def upload(self, collection: str, protected: Protected, idempotency_key: str | None) -> dict:
        return self.gateway.upload(
            collection,
            cipher_png=encode_png(protected.cipher),
            mask_png=encode_png(protected.mask),
            metadata_json=protected.metadata.model_dump_json(),
            idempotency_key=idempotency_key,
        )

    def master_of(self, metadata: ImageMetadata) -> MasterKey:
        """The keyring's master key that tagged `metadata` (IntegrityError if none or unknown).

        Only the tag's key id selects the key; `from_wire` and `verify_tag` then hold the
        (signed) key facts to the same key, so a stored record cannot mix keys.
        """
        if metadata.integrity is None:
            raise IntegrityError(f"image {metadata.opaque_id} carries no integrity tag")
        try:
            return self.keyring.get(metadata.integrity.key_id)
        except UnknownKey as exc:
            raise IntegrityError(str(exc)) from None

    def verified(
        self, cipher: np.ndarray, mask: np.ndarray, metadata: ImageMetadata
    ) -> tuple[MasterKey, CipherMetadata]:
        """Check the owner's tag over cipher, mask and metadata; the master key and record."""
        master = self.master_of(metadata)
        record = from_wire(metadata)
        verify_tag(cipher, record, master, mask=mask)
        return master, record

    def open(self, cipher: np.ndarray, mask: np.ndarray, metadata: ImageMetadata) -> np.ndarray:
        """Verify the owner's tag, then decrypt bit-exactly; IntegrityError if tampered."""
        master, record = self.verified(cipher, mask, metadata)
        return unseal(cipher, record, master)

    # -- via the gateway -----------------------------------------------------------------------
    def fetch(self, collection: str, image_id: str, owner: str | None = None):
        stored = self.gateway.metadata(collection, image_id, owner=owner)
        try:
            metadata = ImageMetadata.model_validate_json(stored)
        except ValueError as exc:
            raise IntegrityError(f"stored metadata of {image_id} is unreadable: {exc}") from None
        cipher_png = self.gateway.cipher(collection, image_id, owner=owner)
        mask_png = self.gateway.mask(collection, image_id, owner=owner)
        try:
            cipher = decode_image_png(cipher_png, "stored cipher")
            mask = decode_mask_png(mask_png, "stored mask")
        except ValueError as exc:
            raise IntegrityError(f"stored image {image_id} is unreadable: {exc}") from None
        return cipher, mask, metadata

    def fetch_plain(self, collection: str, image_id: str, owner: str | None = None):
        cipher, mask, metadata = self.fetch(collection, image_id, owner)
        return self.open(cipher, mask, metadata), mask, metadata

    def search(
        self, collection: str, pixels: np.ndarray, mask: np.ndarray, k: int, owner: str | None
    ) -> SearchResponse:
        """Encrypt the query under a fresh key of its own, search, return the hits."""
        query = self.protect(pixels, mask, opaque_id=self.query_ids(), role="query")
        return self.gateway.search(
            collection,
            cipher_png=encode_png(query.cipher),
            mask_png=encode_png(query.mask),
            k=k,
            owner=owner,
        )

    def release_key(
        self, cipher: np.ndarray, mask: np.ndarray, metadata: ImageMetadata
    ) -> ImageKey:
        """The key of a stored image, only after its owner's tag checked out (as for decrypt)."""
        master, record = self.verified(cipher, mask, metadata)
        height, width = record.shape
        key = image_key_for(master, record.image_id, record.key_mode, height * width)
        if key.counter != record.key_counter or key.check != record.key_check:
            raise IntegrityError(f"stored key facts of {metadata.opaque_id} do not match")
        return key
