"""Owner-side operations: protect (8-bit + encrypt + tag) or seal, upload, fetch-verify-open.

Every collection is protected in one of three modes, chosen by the owner (`mode_of`): `pe`,
the paper's perceptual cipher, `sealed` (`pecbir_encryptor.sealed`) and `pe-roi`
(`pecbir_encryptor.pe_roi`: the image sealed, the cloud's features read a scrambled ROI-only
cipher).  Records of every mode are bound to their identity: a v3 tag (pe, pe-roi) or the
AEAD's associated data (sealed, pe-roi) covers tenant, collection and the owner's opaque id, and
the cloud's image id is a public function of those (`pecbir_contracts.layout.image_id_for`), so
a record handed back for another id is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pecbir_contracts.layout import image_id_for
from pecbir_contracts.png import decode_image_png, decode_mask_png, encode_png
from pecbir_contracts.routes import GATEWAY_IMAGE_STATUS
from pecbir_contracts.schemas import (
    MAX_K,
    ImageMetadata,
    ProtectionRecord,
    SealedImageMetadata,
    SearchResponse,
    parse_stored_record,
)
from pecbir_contracts.vectors import encode_vector_npy
from pecbir_encryptor.audit import AuditLog
from pecbir_encryptor.content_index import ContentIndex, StoredRef
from pecbir_encryptor.dicom_refs import DicomRefs
from pecbir_encryptor.gateway_client import GatewayClient, GatewayError
from pecbir_encryptor.integrity import IntegrityError
from pecbir_encryptor.keyring import Keyring, UnknownKey
from pecbir_encryptor.pe_roi import RoiUpload, protect_roi
from pecbir_encryptor.pending import PendingPairs
from pecbir_encryptor.protection import (
    sign_protection,
    signing_key_from_master,
    verify_protection,
)
from pecbir_encryptor.sealed import PatchModels, SealedUpload, features_of, seal_for_cloud
from pecbir_encryptor.wire import from_wire, to_wire
from pecore.cipher import decrypt, to_uint8
from pecore.cipher_roi import DEFAULT_ROI_SCHEME, RoiCipher, is_roi_scheme
from pecore.envelope import CipherMetadata, image_key_for, seal, tag, unseal, verify_tag
from pecore.keys import ImageKey, MasterKey
from pecore.owner_features import PatchModelFeaturizer
from pecore.sealing import (
    SealedIdentity,
    open_sealed,
    open_with_data_key,
    read_header,
    rewrap,
    unwrap_data_key,
)

Mode = Literal["pe", "sealed", "pe-roi"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protected:
    cipher: np.ndarray
    mask: np.ndarray
    metadata: ImageMetadata


@dataclass(frozen=True)
class RewrapResult:
    """One image of a batch re-wrap: ``rewrapped`` (from `old` to `new` key id), ``current``
    (already under the active key) or ``failed`` (with the reason)."""

    image_id: str
    state: Literal["rewrapped", "current", "failed"]
    old_key_id: str | None = None
    new_key_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Opened:
    """A stored image, checked and opened at the hospital.

    Attributes
    ----------
    image
        pe: the 8-bit plain image; sealed, pe-roi: the image exactly as the owner held it.
    mask
        Its tumour mask.
    record
        The cloud's record of it.
    label
        Its class label: a training template's from the record, any other sealed (or
        pe-roi) image's from inside its blob (the cloud never read it); None when unknown.
    lossy
        A sealed image that went through lossy compression before it came (its blob says so).
    """

    image: np.ndarray
    mask: np.ndarray | None
    record: ImageMetadata | SealedImageMetadata
    label: int | None
    lossy: bool = False


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
    tenant: str | None = None,
    collection: str | None = None,
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
    tenant, collection : str or None
        Where it goes: given, a v3 record bound to them whose key is also derived from the
        content; None, a v2 record (benchmarks, known-answer tests).

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
        tenant=tenant,
        collection=collection,
    )
    record = tag(cipher, record, master, mask=mask)
    return Protected(cipher, mask, to_wire(record))


@dataclass(frozen=True)
class _Push:
    """One image on its way to the cloud: what `Encryptor.ingest` was asked to upload."""

    mode: Mode
    collection: str
    pixels: np.ndarray
    mask: np.ndarray
    opaque_id: str
    label: int | None
    role: str
    train: bool
    idempotency_key: str | None
    lossy: bool

    @property
    def cloud_label(self) -> int | None:
        """The label the cloud may see: a marked template's only."""
        return self.label if self.train and self.role == "template" else None


class Encryptor:
    def __init__(
        self,
        master: MasterKey | Keyring,
        gateway: httpx.Client,
        *,
        scheme: str = "ours",
        key_mode: str = "per-image",
        audit_log: Path | None = None,
        tenant: str | None = None,
        sealed_collections: Collection[str] = (),
        patch_models: Path | None = None,
        accept_unbound_records: bool = False,
        pe_roi_collections: Collection[str] = (),
        pe_roi_scheme: str = DEFAULT_ROI_SCHEME,
        pending_dir: Path | None = None,
        template_collections: Collection[str] = (),
        content_index: Path | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        trusted_owners: dict[str, str] | None = None,
        dicom_refs_dir: Path | None = None,
    ) -> None:
        # New uploads use the active key; stored images are opened with the key they name.
        self.keyring = master if isinstance(master, Keyring) else Keyring(master)
        self.master = self.keyring.active
        self.gateway = GatewayClient(gateway)
        self.scheme = scheme
        self.key_mode = key_mode
        self.audit = AuditLog(audit_log)
        # None only for offline use (tests, benchmarks): records are then v2, not bound.
        self.tenant = tenant
        self.sealed_collections = frozenset(sealed_collections)
        self.pe_roi_collections = frozenset(pe_roi_collections)
        both = self.sealed_collections & self.pe_roi_collections
        if both:
            raise ValueError(f"collections {sorted(both)} cannot be both sealed and pe-roi")
        # The explicit spelling: what the records name, whatever "pe-roi" means later.
        self.pe_roi_scheme = RoiCipher.from_name(pe_roi_scheme).legacy_name
        self.patch_models = PatchModels(patch_models, self.gateway)
        self.accept_unbound_records = accept_unbound_records
        # The owner's policy for uploads that do not say whether they are training templates
        # (a PACS push): templates in these collections, not templates anywhere else.
        self.template_collections = frozenset(template_collections)
        # What this hospital stored, by keyed content digest: a query of a stored image goes
        # by reference (`search`), never as a second cipher of it.
        self.content_index = ContentIndex(content_index)
        # Signs this owner's protection records; its peers' public keys check theirs.
        self.signing_key = signing_key or signing_key_from_master(self.master)
        self.trusted_owners = dict(trusted_owners or {})
        self._protection_published: set[str] = set()
        self._protection_lock = threading.Lock()
        # Halves of image <-> SEG pairs waiting for the other (None: not kept, refused).
        self.pending = (
            PendingPairs(pending_dir, self.keyring, tenant, self.opaque_id_for)
            if pending_dir is not None
            else None
        )
        # Image id -> DICOM UIDs of what came as DICOM (the page's viewer links; None: none kept).
        self.dicom_refs = (
            DicomRefs(dicom_refs_dir, self.keyring, tenant) if dicom_refs_dir is not None else None
        )

    # -- the owner's choice of protection ------------------------------------------------------
    def mode_of(self, collection: str, owner: str | None = None) -> Mode:
        """How `collection` is protected (see `protection_of`)."""
        return self.protection_of(collection, owner)[0]

    def protection_of(self, collection: str, owner: str | None = None) -> tuple[Mode, str | None]:
        """(mode, pe-roi scheme or None) of `collection`.

        The owner's setting for its own collections; for a collection shared by another
        owner, what the cloud says (sealed: a published patch model; pe-roi: its images'
        scheme), so that a query never goes out in a weaker form than the collection's images.
        """
        if owner is None or owner == self.tenant:
            if collection in self.sealed_collections:
                return "sealed", None
            if collection in self.pe_roi_collections:
                return "pe-roi", self.pe_roi_scheme
            return "pe", None
        record = self.peer_protection(collection, owner)
        return record.mode, record.scheme

    def peer_protection(self, collection: str, owner: str) -> ProtectionRecord:
        """Another owner's signed record of `collection`'s protection, checked against that
        owner's public key (UntrustedProtection: missing, forged, or not what the cloud says)."""
        held = self.gateway.protection(collection, owner=owner)
        return verify_protection(
            held, owner=owner, collection=collection, trusted=self.trusted_owners
        )

    def protection_record(self, collection: str) -> ProtectionRecord:
        """This owner's record of one of its collections, as it signs it."""
        mode, scheme = self.protection_of(collection)
        digest = self.patch_models.own(collection)[1] if mode == "sealed" else None
        return ProtectionRecord(
            tenant=self._bound_tenant(None),
            collection=collection,
            mode=mode,
            scheme=scheme,
            patch_model=digest,
        )

    def publish_protection(self, collection: str) -> ProtectionRecord:
        """Sign this owner's protection record of `collection` and publish it to the cloud."""
        record = self.protection_record(collection)
        self.gateway.put_protection(collection, sign_protection(self.signing_key, record))
        with self._protection_lock:
            self._protection_published.add(collection)
        return record

    def _ensure_protection_published(self, collection: str) -> None:
        """Publish the signed record once per collection and process (after an upload, when
        the cloud holds the collection in its mode); a refusal is logged, tried again later."""
        with self._protection_lock:
            if collection in self._protection_published:
                return
        try:
            self.publish_protection(collection)
        except (GatewayError, ValueError, httpx.HTTPError) as exc:
            log.warning("protection record of %s not published yet: %s", collection, exc)

    def _bound_tenant(self, owner: str | None) -> str:
        tenant = owner or self.tenant
        if tenant is None:
            raise ValueError("this encryptor serves no tenant; it cannot bind records to one")
        return tenant

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

    def query_id_for(self, pixels: np.ndarray, mask: np.ndarray) -> str:
        """Id (and so key) of a query image: keyed hash of its content, in a domain of its own.

        The same query image always gets the same id, so its cipher (and its ranking) is the
        same every time: repeating a query gives the cloud no second cipher of it.  The label
        differs from the stored images' (`opaque_id_for`), so a query never shares a stored
        key; a query pixel-identical to a stored image is therefore a second cipher of that
        image (once), which the pe mode cannot avoid without the stored image's id.
        """
        pixels = np.ascontiguousarray(pixels)
        digest = hmac.new(self.master.secret.get_secret_value(), digestmod=hashlib.sha256)
        digest.update(b"pecbir/query-id/v1\x00")
        digest.update(f"{pixels.dtype.str}:{pixels.shape}\x00".encode())
        digest.update(pixels.tobytes())
        digest.update(np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes())
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
        collection: str | None = None,
        owner: str | None = None,
    ) -> Protected:
        """`protect_image` with this encryptor's active key, scheme and key mode.

        With a `collection` (and a tenant), a v3 record bound to ``(owner or tenant,
        collection)``.
        """
        bound = collection is not None and (owner or self.tenant) is not None
        return protect_image(
            pixels,
            mask,
            master=self.master,
            opaque_id=opaque_id,
            scheme=self.scheme,
            key_mode=self.key_mode,
            label=label,
            role=role,
            tenant=self._bound_tenant(owner) if bound else None,
            collection=collection if bound else None,
        )

    def seal(
        self,
        collection: str,
        pixels: np.ndarray,
        mask: np.ndarray,
        *,
        opaque_id: str,
        label: int | None = None,
        role: str = "template",
        train: bool = False,
        lossy: bool = False,
    ) -> SealedUpload:
        """`seal_for_cloud` with this encryptor's active key and the collection's patch model."""
        return seal_for_cloud(
            pixels,
            _check_mask(mask, pixels.shape),
            master=self.master,
            tenant=self._bound_tenant(None),
            collection=collection,
            opaque_id=opaque_id,
            model=self.patch_models.own(collection),
            label=label,
            role=role,
            train=train,
            lossy=lossy,
        )

    def protect_roi(
        self,
        collection: str,
        pixels: np.ndarray,
        mask: np.ndarray,
        *,
        opaque_id: str,
        label: int | None = None,
        role: str = "template",
        train: bool = False,
        scheme: str | None = None,
        owner: str | None = None,
    ) -> RoiUpload:
        """`protect_roi` with this encryptor's active key, bound to (owner or tenant,
        collection); `scheme` defaults to this owner's pe-roi scheme."""
        return protect_roi(
            pixels,
            _check_mask(mask, pixels.shape),
            master=self.master,
            tenant=self._bound_tenant(owner),
            collection=collection,
            opaque_id=opaque_id,
            scheme=scheme or self.pe_roi_scheme,
            label=label,
            role=role,
            train=train,
        )

    def ingest(
        self,
        collection: str,
        pixels: np.ndarray,
        mask: np.ndarray,
        *,
        opaque_id: str,
        label: int | None = None,
        role: str = "template",
        train: bool | None = None,
        idempotency_key: str | None = None,
        lossy: bool = False,
    ) -> dict:
        """Protect one image as its collection's mode says and upload it; the gateway's answer.

        Parameters
        ----------
        collection
            Target collection (its mode: `mode_of`).
        pixels, mask
            The plain image and its tumour mask.
        opaque_id
            The image's pseudonym.
        label, role
            Class label and role.
        train
            A training template: only then is the label readable by the cloud (pe: a
            non-training image's label is not sent at all; sealed, pe-roi: it is inside the
            blob). None (not said, e.g. a PACS push): the owner's policy, a template only in
            the `template_collections`.
        idempotency_key
            Sent to the gateway.
        lossy
            The pixels went through lossy compression: sealed collections mark it inside the
            blob (a pe record has no place for it; its 8-bit rule loses more anyway).

        Raises
        ------
        ValueError
            Bad input (nothing was sent).
        GatewayError
            The cloud refused or failed the upload.
        """
        if train is None:
            train = collection in self.template_collections
        mode = self.mode_of(collection)
        push = _Push(
            mode, collection, pixels, mask, opaque_id, label, role, train, idempotency_key, lossy
        )
        cloud_label = push.cloud_label
        known = self.stored_match(collection, pixels, mask)
        if (
            known is not None
            and (known.opaque_id, known.role, known.cloud_label) == (opaque_id, role, cloud_label)
            and self._in_cloud(collection, known.image_id)
        ):
            # A re-push of an image stored as it is now (e.g. a PACS re-sending a study, also
            # after a rotation): answered like the first time, and nothing is sent again, so
            # the cloud never receives a second cipher of it.
            answer = self._answer_for(collection, opaque_id)
        else:
            answer = self._upload_once(push)
        if role == "template" and answer.get("image_id"):
            ref = StoredRef(collection, str(answer["image_id"]), opaque_id, role, cloud_label)
            self.content_index.add(self.master, ref, pixels, mask)
            if mode == "pe":
                # the pe hit opens 8-bit: a query taken from it (a stored study) is that
                self.content_index.add(self.master, ref, to_uint8(pixels)[0], mask)
        self._ensure_protection_published(collection)
        # The hospital's own list of what it stored (the web page's "stored studies"): the
        # cloud keeps no list a hospital could read without trusting it.
        self.audit.write(
            action="upload",
            outcome="stored",
            collection=collection,
            image_id=answer.get("image_id"),
            opaque_id=opaque_id,
            mode=mode,
            role=role,
            label=label,
            train=train,
        )
        return answer

    def _in_cloud(self, collection: str, image_id: str) -> bool:
        """Whether the cloud holds a record under `image_id` (GatewayError if it cannot say)."""
        try:
            self.gateway.metadata(collection, image_id, owner=None)
        except GatewayError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _upload_once(self, push: _Push) -> dict:
        """`_protect_and_upload`; a 409 for an image the cloud holds with exactly these pixels
        and mask under a retired master key is answered like the first upload."""
        try:
            answer = self._protect_and_upload(push)
        except GatewayError as exc:
            # A re-push of an image stored under a master key since rotated: its content-bound
            # key changed with the master key, so the cloud sees other bytes under its id.
            if exc.status != 409 or not self._stored_as(
                push.collection,
                push.opaque_id,
                push.mode,
                push.pixels,
                push.mask,
                (push.role, push.cloud_label),
                push.label if push.role == "template" else None,
            ):
                raise
            answer = self._answer_for(push.collection, push.opaque_id)
        return answer

    def _stored_as(
        self,
        collection: str,
        opaque_id: str,
        mode: Mode,
        pixels: np.ndarray,
        mask: np.ndarray,
        public: tuple[str, int | None],
        private_label: int | None,
    ) -> bool:
        """Whether the cloud's record under `opaque_id` opens (verified) to exactly these
        pixels and mask (pe: their 8-bit version), says the same (role, label) as `public` (a
        re-push that would make a template of it is another upload, refused) and, sealed or
        pe-roi, holds `private_label` inside its blob."""
        image_id = image_id_for(self._bound_tenant(None), collection, opaque_id)
        try:
            opened = self.fetch_plain(collection, image_id)
        except (GatewayError, IntegrityError, ValueError):
            return False
        expected = to_uint8(pixels)[0] if mode == "pe" else np.asarray(pixels)
        checked = _check_mask(mask, pixels.shape)
        return (
            opened.mask is not None
            and (opened.record.role, opened.record.label) == public
            and (mode == "pe" or opened.label == private_label)
            and opened.image.dtype == expected.dtype
            and opened.image.shape == expected.shape
            and opened.image.tobytes() == expected.tobytes()
            and np.array_equal(opened.mask.astype(bool), checked)
        )

    def _answer_for(self, collection: str, opaque_id: str) -> dict:
        """The gateway's answer to the first upload of `opaque_id` (same id, same status URL)."""
        tenant = self._bound_tenant(None)
        image_id = image_id_for(tenant, collection, opaque_id)
        status = GATEWAY_IMAGE_STATUS.format(collection=collection, image_id=image_id)
        return {
            "image_id": image_id,
            "collection": collection,
            "state": "stored",
            "status_url": f"{status}?owner={tenant}",
        }

    def _protect_and_upload(self, push: _Push) -> dict:
        """Protect one image in its collection's mode and upload it; the gateway's answer."""
        collection, pixels, mask = push.collection, push.pixels, push.mask
        who = {"opaque_id": push.opaque_id, "role": push.role}
        if push.mode == "pe-roi":
            roi = self.protect_roi(
                collection, pixels, mask, label=push.label, train=push.train, **who
            )
            return self.gateway.upload(
                collection,
                cipher_png=encode_png(roi.cipher),
                mask_png=encode_png(roi.mask),
                metadata_json=roi.metadata.model_dump_json(),
                idempotency_key=push.idempotency_key,
                blob=roi.blob,
            )
        if push.mode == "sealed":
            sealed = self.seal(
                collection,
                pixels,
                mask,
                label=push.label,
                train=push.train,
                lossy=push.lossy,
                **who,
            )
            return self.gateway.upload_sealed(
                collection,
                blob=sealed.blob,
                fisher_npy=encode_vector_npy(sealed.fisher_vector),
                metadata_json=sealed.metadata.model_dump_json(),
                idempotency_key=push.idempotency_key,
            )
        protected = self.protect(
            pixels,
            mask,
            label=push.label if push.train else None,
            collection=collection,
            **who,
        )
        return self.upload(collection, protected, push.idempotency_key)

    def publish_patch_model(
        self,
        collection: str,
        images: list[np.ndarray],
        masks: list[np.ndarray],
        **params: object,
    ) -> str:
        """Fit a sealed collection's patch model on plain images, keep it, publish it.

        Parameters
        ----------
        collection
            One of this owner's sealed collections.
        images, masks
            Plain images (its templates, or a public set) and their tumour masks.
        **params
            `PatchModelFeaturizer` parameters (n_components, n_regions, patch_size, ...).

        Returns
        -------
        str
            The published model's SHA-256.
        """
        if collection not in self.sealed_collections:
            raise ValueError(
                f"collection {collection!r} is not sealed (PECBIR_ENCRYPTOR_SEALED_COLLECTIONS)"
            )
        plain = [to_uint8(np.asarray(image))[0] for image in images]
        checked = [_check_mask(m, p.shape) for m, p in zip(masks, plain, strict=True)]
        featurizer = PatchModelFeaturizer(**params).fit(plain, checked)
        digest = self.patch_models.publish(collection, featurizer)
        self._ensure_protection_published(collection)
        return digest

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
        self,
        cipher: np.ndarray,
        mask: np.ndarray,
        metadata: ImageMetadata,
        *,
        requested: tuple[str, str, str] | None = None,
    ) -> tuple[MasterKey, CipherMetadata]:
        """Check the owner's tag over cipher, mask and metadata; the master key and record.

        `requested` is the (tenant, collection, image id) the record was fetched for: a v3
        record must be bound to exactly that (its tag covers tenant and collection; its opaque
        id must map to the image id).  A record from before v3 names no identity, so the
        cloud could have served it for another image: refused (IntegrityError) when it was
        fetched for an identity, unless `accept_unbound_records` (a migration window: then
        verified with a warning in the log).
        """
        master = self.master_of(metadata)
        tenant, collection, image_id = requested if requested else (None, None, None)
        record = from_wire(metadata, tenant=tenant, collection=collection)
        verify_tag(cipher, record, master, mask=mask)
        if record.identity_bound and image_id is not None:
            _check_bound_id(tenant, collection, image_id, record.image_id)
        elif not record.identity_bound:
            version = metadata.integrity.version if metadata.integrity else "?"
            if requested is not None and not self.accept_unbound_records:
                raise IntegrityError(
                    f"image {metadata.opaque_id}: its record (tag v{version}) is bound to no "
                    "tenant, collection or id, so the cloud could have served it for another "
                    "image; re-upload it (or set PECBIR_ENCRYPTOR_ACCEPT_UNBOUND_RECORDS=true "
                    "while migrating)"
                )
            log.warning(
                "image %s: legacy record (tag v%s) bound to no tenant/collection/id; "
                "re-upload it to bind it",
                metadata.opaque_id,
                version,
            )
        return master, record

    def open(
        self,
        cipher: np.ndarray,
        mask: np.ndarray,
        metadata: ImageMetadata,
        *,
        requested: tuple[str, str, str] | None = None,
    ) -> np.ndarray:
        """Verify the owner's tag, then decrypt bit-exactly; IntegrityError if tampered."""
        master, record = self.verified(cipher, mask, metadata, requested=requested)
        return unseal(cipher, record, master)

    def _sealed_blob(
        self,
        tenant: str,
        collection: str,
        image_id: str,
        metadata: SealedImageMetadata | ImageMetadata,
    ) -> tuple[MasterKey, SealedIdentity, bytes]:
        """(master key its wrap names, expected identity, blob) of a sealed or pe-roi record."""
        _check_bound_id(tenant, collection, image_id, metadata.opaque_id)
        blob = self.gateway.sealed(collection, image_id, owner=tenant)
        header = read_header(blob)
        try:
            master = self.keyring.get(header.wrap.key_id)
        except UnknownKey as exc:
            raise IntegrityError(str(exc)) from None
        identity = SealedIdentity(tenant=tenant, collection=collection, image_id=metadata.opaque_id)
        return master, identity, blob

    # -- via the gateway -----------------------------------------------------------------------
    def fetch_record(
        self, collection: str, image_id: str, owner: str | None = None
    ) -> ImageMetadata | SealedImageMetadata:
        """The stored record of an image (not yet verified: the cloud wrote it)."""
        stored = self.gateway.metadata(collection, image_id, owner=owner)
        try:
            return parse_stored_record(stored)
        except ValueError as exc:
            raise IntegrityError(f"stored metadata of {image_id} is unreadable: {exc}") from None

    def _fetch_pixels(
        self, collection: str, image_id: str, owner: str | None, metadata: ImageMetadata
    ):
        """(cipher, mask, record) of a pe image, not yet verified."""
        cipher_png = self.gateway.cipher(collection, image_id, owner=owner)
        mask_png = self.gateway.mask(collection, image_id, owner=owner)
        try:
            cipher = decode_image_png(cipher_png, "stored cipher")
            mask = decode_mask_png(mask_png, "stored mask")
        except ValueError as exc:
            raise IntegrityError(f"stored image {image_id} is unreadable: {exc}") from None
        return cipher, mask, metadata

    def fetch_plain(self, collection: str, image_id: str, owner: str | None = None) -> Opened:
        """A stored image of either mode, checked and opened (IntegrityError if it is not
        the owner's record of exactly this tenant, collection and id, or changed)."""
        requested = (self._bound_tenant(owner), collection, image_id)
        metadata = self.fetch_record(collection, image_id, owner)
        if isinstance(metadata, SealedImageMetadata) or is_roi_scheme(metadata.key.scheme):
            # pe-roi: the cloud's cipher holds the ROI only; the image is in the blob
            master, identity, blob = self._sealed_blob(*requested, metadata)
            contents = open_sealed(blob, master, identity)
            label = contents.metadata.get("label")
            lossy = bool(contents.metadata.get("lossy", False))
            return Opened(contents.image, contents.mask, metadata, label, lossy)
        cipher, mask, metadata = self._fetch_pixels(collection, image_id, owner, metadata)
        plain = self.open(cipher, mask, metadata, requested=requested)
        return Opened(plain, mask, metadata, metadata.label)

    # -- corrected masks: versions of an image ---------------------------------------------------
    def retired_versions(self, collection: str) -> frozenset[str]:
        """Cloud ids of images of this owner replaced by a newer version (a corrected SEG) that
        is searchable now; a newer version that is not yet searchable is promoted here first."""
        if self.pending is None:
            return frozenset()

        def searchable(image_id: str) -> bool:
            try:
                status = self.gateway.status(collection, image_id, owner=None)
            except GatewayError:
                return False
            return status.get("state") == "searchable"

        retired = self.pending.promote(collection, searchable)
        self._retire_in_cloud(collection)
        return retired

    def _retire_in_cloud(self, collection: str) -> None:
        """Retire in the cloud the versions retired here (out of its index and training set);
        one the cloud cannot retire now is asked again at the next call (search, sweep)."""
        settled = []
        for old, new in self.pending.unsettled(collection):
            try:
                self.gateway.retire(collection, old, f"replaced by {new} (corrected DICOM SEG)")
            except GatewayError as exc:
                if exc.status != 404:  # 404: not in the cloud at all, nothing to retire
                    log.warning("could not retire %s in the cloud yet: %s", old, exc)
                    continue
            self.audit.write(action="retire", collection=collection, image_id=old, by=new)
            settled.append(old)
        self.pending.settle(collection, settled)

    def image_id_of(self, collection: str, source_uid: str) -> str:
        """The cloud id of the version served of the image with SOP Instance UID `source_uid`."""
        self.retired_versions(collection)
        version = self.pending.version(collection, source_uid) if self.pending else None
        if version is not None:
            return version.current
        return image_id_for(self._bound_tenant(None), collection, self.opaque_id_for(source_uid))

    def open_released(
        self, collection: str, image_id: str, owner: str, released: dict[str, object]
    ) -> Opened:
        """Another owner's stored image, opened with the key its owner released for it.

        The owner's integrity tag needs the owner's master key, so it is checked there, before
        the release (`release`); here the record must be bound to exactly this owner,
        collection and id, the released key must be that image's, and its check value (pe)
        or the AEAD (sealed, pe-roi: the blob's data key) must hold.

        Parameters
        ----------
        collection, image_id
            The hit: the owner's collection and the cloud's image id.
        owner
            The owning hospital's tenant.
        released
            Its encryptor's key-release answer (``mode`` and ``key`` or ``data_key``).

        Returns
        -------
        Opened
            The plain image (pe: 8-bit; sealed, pe-roi: as the owner held it), mask and label.

        Raises
        ------
        IntegrityError
            The record, the key or the blob do not belong together.
        GatewayError
            The cloud refused or failed a read.
        """
        metadata = self.fetch_record(collection, image_id, owner)
        _check_bound_id(owner, collection, image_id, metadata.opaque_id)
        if isinstance(metadata, SealedImageMetadata):
            mode = "sealed"
        else:
            mode = "pe-roi" if is_roi_scheme(metadata.key.scheme) else "pe"
        if released.get("mode") != mode:
            raise IntegrityError(f"image {image_id} is {mode}; the released key is not")
        if mode != "pe":  # the whole image is in the blob (a pe-roi cipher holds its ROI only)
            blob = self.gateway.sealed(collection, image_id, owner=owner)
            identity = SealedIdentity(
                tenant=owner, collection=collection, image_id=metadata.opaque_id
            )
            try:
                data_key = base64.b64decode(str(released["data_key"]), validate=True)
                contents = open_with_data_key(blob, data_key, identity)
            except (KeyError, ValueError) as exc:
                raise IntegrityError(f"sealed image {image_id} does not open: {exc}") from None
            return Opened(contents.image, contents.mask, metadata, contents.metadata.get("label"))
        cipher, mask, metadata = self._fetch_pixels(collection, image_id, owner, metadata)
        try:
            key = ImageKey.model_validate(released["key"])
        except (KeyError, ValueError) as exc:
            raise IntegrityError(f"released key of {image_id} is unreadable: {exc}") from None
        facts = metadata.key
        if (
            key.image_id != metadata.opaque_id
            or key.n_pixels != cipher.size
            or (key.counter, key.check) != (facts.counter, facts.check)
        ):
            raise IntegrityError(f"the released key is not the key of image {image_id}")
        try:
            plain = decrypt(cipher, key.stream(), facts.scheme)
        except ValueError as exc:
            raise IntegrityError(str(exc)) from None
        return Opened(plain, mask, metadata, metadata.label)

    def search(
        self, collection: str, pixels: np.ndarray, mask: np.ndarray, k: int, owner: str | None
    ) -> SearchResponse:
        """Search with a plain query image; the hits.

        Sealed collection: the query's Fisher vector, computed here with the collection's
        patch model. pe collection: the query encrypted under its content-derived key
        (`query_id_for`), so the same query gives the same cipher and the same hits; pe-roi:
        the same, through the collection's pe-roi cipher (ROI only, scrambled).
        """
        own = owner in (None, self.tenant)
        stored = self.stored_match(collection, pixels, mask) if own else None
        if stored is not None:
            return self.search_stored(collection, stored.image_id, k)
        signed = None if own else self.peer_protection(collection, owner)
        mode, scheme = (
            self.protection_of(collection)
            if signed is None
            else (
                signed.mode,
                signed.scheme,
            )
        )
        # Versions replaced by a corrected SEG stay in the cloud's index: asked for and dropped.
        retired = self.retired_versions(collection) if own else frozenset()
        if mode == "sealed":
            model = (
                self.patch_models.own(collection)
                if signed is None
                else self.patch_models.shared(owner, collection, expected=signed.patch_model)
            )
            if model is None:
                raise ValueError(f"collection {collection!r} has no published patch model")
            fisher = features_of(model[0], pixels, _check_mask(mask, pixels.shape))
            answer = self.gateway.search_fisher(
                collection,
                fisher_npy=encode_vector_npy(fisher),
                k=min(k + len(retired), MAX_K),
                owner=owner,
            )
            return _without(answer, retired, k)
        query_id = self.query_id_for(pixels, mask)
        if mode == "pe-roi":
            if signed is None:
                self._check_held_roi_scheme(collection, scheme)
            query = self.protect_roi(
                collection,
                pixels,
                mask,
                opaque_id=query_id,
                role="query",
                scheme=scheme,
                owner=owner,
            )
        else:
            query = self.protect(
                pixels, mask, opaque_id=query_id, role="query", collection=collection, owner=owner
            )
        answer = self.gateway.search(
            collection,
            cipher_png=encode_png(query.cipher),
            mask_png=encode_png(query.mask),
            k=min(k + len(retired), MAX_K),
            owner=owner,
        )
        return _without(answer, retired, k)

    def _check_held_roi_scheme(self, collection: str, scheme: str | None) -> None:
        """Refuse a query of one of this owner's pe-roi collections whose images were stored
        under another pe-roi scheme than this encryptor's (e.g. pe-roi-t16dn-in records from
        before the default became pe-roi-t16d): its features would not match theirs, and nothing
        in a query names its scheme.  The cloud's word can only make this refuse, never change
        the scheme a query goes out under."""
        held = self.gateway.protection(collection, owner=None).scheme
        if held is not None and held != scheme:
            raise ValueError(
                f"collection {collection!r} holds {held} images, but this encryptor's pe-roi "
                f"scheme is {scheme}: set PECBIR_ENCRYPTOR_PE_ROI_SCHEME={held} for it"
            )

    def stored_match(
        self, collection: str, pixels: np.ndarray, mask: np.ndarray
    ) -> StoredRef | None:
        """This hospital's stored image of `collection` with exactly these pixels and mask (its
        keyed content index, under every key of the keyring), or None."""
        return self.content_index.find(
            self.keyring.masters(), collection, pixels, _check_mask(mask, pixels.shape)
        )

    def search_stored(self, collection: str, image_id: str, k: int) -> SearchResponse:
        """Search with one of this owner's stored images, by reference: the cloud ranks with
        the vector it holds for it and receives no new cipher (or vector) of it."""
        retired = self.retired_versions(collection)
        answer = self.gateway.search_stored(collection, image_id, k=min(k + len(retired), MAX_K))
        return _without(answer, retired, k)

    def release_key(
        self,
        cipher: np.ndarray,
        mask: np.ndarray,
        metadata: ImageMetadata,
        *,
        requested: tuple[str, str, str] | None = None,
    ) -> ImageKey:
        """The key of a stored image, only after its owner's tag checked out (as for decrypt)."""
        master, record = self.verified(cipher, mask, metadata, requested=requested)
        height, width = record.shape
        key = image_key_for(
            master, record.image_id, record.key_mode, height * width, salt=record.key_salt
        )
        if key.counter != record.key_counter or key.check != record.key_check:
            raise IntegrityError(f"stored key facts of {metadata.opaque_id} do not match")
        return key

    def rewrap(self, collection: str, image_id: str) -> tuple[str, str]:
        """Re-wrap a sealed image's data key under the active master key (after a rotation).

        The blob is authenticated under the key it names first; the cloud then checks that
        only the wrap changed.  Returns (old key id, new key id); equal when nothing was due.
        """
        requested = (self._bound_tenant(None), collection, image_id)
        metadata = self.fetch_record(collection, image_id)
        if not isinstance(metadata, SealedImageMetadata) and not is_roi_scheme(metadata.key.scheme):
            raise ValueError(f"image {image_id} is not sealed: a pe key cannot be re-wrapped")
        master, identity, blob = self._sealed_blob(*requested, metadata)
        if master.key_id != self.master.key_id:
            self.gateway.put_sealed(
                collection, image_id, rewrap(blob, master, self.master, identity)
            )
        return master.key_id, self.master.key_id

    def sealed_uploads(self, collection: str) -> list[str]:
        """Cloud ids of the sealed and pe-roi images this hospital uploaded to `collection`
        (its own upload records, oldest first, each once): what a rotation must re-wrap."""
        seen: dict[str, None] = {}
        for record in self.audit.read(actions={"upload"}):
            if (
                record.get("collection") == collection
                and record.get("mode") in ("sealed", "pe-roi")
                and record.get("role", "template") == "template"
                and record.get("image_id")
            ):
                seen.setdefault(str(record["image_id"]), None)
        return list(seen)

    def rewrap_many(
        self,
        collection: str,
        image_ids: list[str],
        *,
        workers: int = 4,
        progress: Callable[[RewrapResult, int, int], None] | None = None,
    ) -> list[RewrapResult]:
        """`rewrap` for many images, `workers` at a time; one result per image, in order.

        An image that fails (not sealed, refused, the cloud down) is reported with its reason
        and the others go on: each re-wrap replaces one blob whole or not at all (the cloud
        accepts only the same payload), so a run can be repeated until none fails.
        `progress(result, done, total)` is called as each finishes.
        """
        total = len(image_ids)
        done = 0
        lock = threading.Lock()

        def one(image_id: str) -> RewrapResult:
            nonlocal done
            try:
                old, new = self.rewrap(collection, image_id)
                result = RewrapResult(image_id, "rewrapped" if old != new else "current", old, new)
            except (GatewayError, IntegrityError, ValueError, httpx.HTTPError) as exc:
                result = RewrapResult(image_id, "failed", reason=str(exc))
            self.audit.write(
                action="rewrap",
                collection=collection,
                image_id=image_id,
                outcome="failed" if result.state == "failed" else "ok",
                state=result.state,
                reason=result.reason,
            )
            with lock:
                done += 1
                if progress is not None:
                    progress(result, done, total)
            return result

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(one, image_ids))

    def release(self, collection: str, image_id: str) -> tuple[str, dict[str, object]]:
        """(opaque id, what is released) for one stored image of this owner, either mode.

        pe: the image's SSLM key; sealed and pe-roi: the data key of that one image's blob
        (base64), after the blob's identity, wrap and payload all authenticated (a pe-roi
        image's SSLM key would open its ROI only).
        """
        requested = (self._bound_tenant(None), collection, image_id)
        metadata = self.fetch_record(collection, image_id)
        if isinstance(metadata, SealedImageMetadata) or is_roi_scheme(metadata.key.scheme):
            master, identity, blob = self._sealed_blob(*requested, metadata)
            data_key = unwrap_data_key(blob, master, identity)
            return metadata.opaque_id, {
                "mode": "sealed" if isinstance(metadata, SealedImageMetadata) else "pe-roi",
                "format": read_header(blob).format,
                "data_key": base64.b64encode(data_key).decode(),
            }
        cipher, mask, metadata = self._fetch_pixels(collection, image_id, None, metadata)
        key = self.release_key(cipher, mask, metadata, requested=requested)
        return metadata.opaque_id, {
            "mode": "pe",
            "scheme": metadata.key.scheme,
            "key": key.model_dump(mode="json"),
        }


def _check_bound_id(tenant: str, collection: str, image_id: str, opaque_id: str) -> None:
    """IntegrityError unless `image_id` is the cloud id of the owner's `opaque_id` there."""
    if image_id_for(tenant, collection, opaque_id) != image_id:
        raise IntegrityError(
            f"the record returned for image {image_id} in {tenant}/{collection} is another "
            f"image's (opaque id {opaque_id}); refusing it"
        )


def _without(answer: SearchResponse, retired: frozenset[str], k: int) -> SearchResponse:
    """`answer` without the hits of retired versions, at most `k` hits."""
    if not retired and len(answer.hits) <= k:
        return answer
    kept = [hit for hit in answer.hits if hit.image_id not in retired][:k]
    hits = [hit.model_copy(update={"rank": rank}) for rank, hit in enumerate(kept, 1)]
    return answer.model_copy(update={"hits": hits, "k": k})
