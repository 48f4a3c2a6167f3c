"""Owner-side operations: protect (8-bit + encrypt + tag), upload, fetch-verify-decrypt."""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from pecbir_contracts.png import decode_image_png, decode_mask_png, encode_png
from pecbir_contracts.schemas import ImageMetadata, KeyInfo, RescaleInfo, SearchResponse
from pecbir_encryptor.audit import AuditLog
from pecbir_encryptor.gateway_client import GatewayClient
from pecbir_encryptor.integrity import IntegrityError, sign, verify
from pecbir_encryptor.keyring import Keyring, UnknownKey
from pecore.cipher import IntensityRescale
from pecore.envelope import CipherMetadata, image_key_for, seal, unseal
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
        """8-bit rule + encryption with the image's key + integrity tag; nothing identifying."""
        mask = _check_mask(mask, pixels.shape)
        cipher, sealed = seal(pixels, self.master, opaque_id, self.scheme, self.key_mode)
        metadata = ImageMetadata(
            opaque_id=opaque_id,
            role=role,
            label=label if role == "template" else None,
            height=cipher.shape[0],
            width=cipher.shape[1],
            rescale=RescaleInfo(**sealed.rescale.model_dump()),
            key=KeyInfo(
                scheme=sealed.scheme,
                mode=sealed.key_mode,
                key_id=sealed.key_id,
                counter=sealed.key_counter,
                check=sealed.key_check,
            ),
        )
        return Protected(cipher, mask, sign(self.master, cipher, mask, metadata))

    def upload(self, collection: str, protected: Protected, idempotency_key: str | None) -> dict:
        return self.gateway.upload(
            collection,
            cipher_png=encode_png(protected.cipher),
            mask_png=encode_png(protected.mask),
            metadata_json=protected.metadata.model_dump_json(),
            idempotency_key=idempotency_key,
        )

    def decrypt_metadata(self, metadata: ImageMetadata) -> CipherMetadata:
        if metadata.rescale is None:
            raise IntegrityError(f"image {metadata.opaque_id} lacks its 8-bit conversion record")
        return CipherMetadata(
            image_id=metadata.opaque_id,
            scheme=metadata.key.scheme,
            key_mode=metadata.key.mode,
            key_id=metadata.key.key_id,
            key_counter=metadata.key.counter,
            key_check=metadata.key.check,
            shape=(metadata.height, metadata.width),
            rescale=IntensityRescale(**metadata.rescale.model_dump()),
        )

    def master_of(self, metadata: ImageMetadata) -> MasterKey:
        """The keyring's master key that tagged `metadata` (IntegrityError if none or unknown).

        Only the tag's key id selects the key; after `verify` the (signed) key facts must name
        the same key, so a stored record cannot mix keys.
        """
        if metadata.integrity is None:
            raise IntegrityError(f"image {metadata.opaque_id} carries no integrity tag")
        try:
            return self.keyring.get(metadata.integrity.key_id)
        except UnknownKey as exc:
            raise IntegrityError(str(exc)) from None

    def verified(self, cipher: np.ndarray, mask: np.ndarray, metadata: ImageMetadata) -> MasterKey:
        """Check the owner's tag over cipher, mask and metadata; the master key to use."""
        master = self.master_of(metadata)
        verify(master, cipher, mask, metadata)
        if metadata.key.key_id != master.key_id:
            raise IntegrityError(
                f"image {metadata.opaque_id}: encrypted under key {metadata.key.key_id} but "
                f"tagged under {master.key_id}; refusing to decrypt"
            )
        return master

    def open(self, cipher: np.ndarray, mask: np.ndarray, metadata: ImageMetadata) -> np.ndarray:
        """Verify the owner's tag, then decrypt bit-exactly; IntegrityError if tampered."""
        master = self.verified(cipher, mask, metadata)
        return unseal(cipher, self.decrypt_metadata(metadata), master)

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
        query = self.protect(pixels, mask, opaque_id=self.opaque_id_for(None), role="query")
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
        master = self.verified(cipher, mask, metadata)
        key = image_key_for(
            master, metadata.opaque_id, metadata.key.mode, metadata.height * metadata.width
        )
        if key.counter != metadata.key.counter or key.check != metadata.key.check:
            raise IntegrityError(f"stored key facts of {metadata.opaque_id} do not match")
        return key
