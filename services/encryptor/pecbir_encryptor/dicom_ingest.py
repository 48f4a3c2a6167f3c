"""DICOM instances in, whatever they came by (STOW-RS now; DIMSE C-STORE uses the same path).

An image and its DICOM SEG may come together or apart: `pecbir_encryptor.stow.pair_instances`
pairs what one batch holds, and the halves without their other wait in the pending store
(`pecbir_encryptor.pending`) until it comes. Every instance gets a PS3.18 outcome: stored
(with a retrieve URL once its pair is in the cloud, with a warning while it waits or when it
has no class label) or failed with a reason.

Outcomes per image, alone in its batch:

* its SEG's mask is waiting: the pair is protected and uploaded; the mask is dropped;
* it is in the cloud already (a re-sent study): stored, nothing to do;
* else it waits for its SEG (stored, warning).

Per image a SEG references outside its batch:

* the image is waiting: the pair is uploaded; the image is dropped;
* the image is in the cloud with the same mask (a replayed SEG): stored, nothing to do;
* in the cloud with another mask (a corrected SEG): the image (opened from the cloud) is
  uploaded again with the new mask as a new version under its own pseudonym, stored with a
  warning; the old version stays served until the new one is searchable, then its hits are
  dropped at the hospital and it is retired in the cloud, out of its index and training set
  (`Encryptor.retired_versions`; its objects are kept);
* else the mask waits for the image (stored, warning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pecbir_contracts.layout import image_id_for
from pecbir_encryptor.core import Encryptor, Opened
from pecbir_encryptor.dicom import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_OUT_OF_RESOURCES,
    FAILURE_PROCESSING,
    WARNING_STORED,
    Instance,
    SegMask,
)
from pecbir_encryptor.dicom_refs import DicomRef
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_encryptor.integrity import IntegrityError
from pecbir_encryptor.pending import PendingImage, PendingMask
from pecbir_encryptor.stow import (
    Failed,
    Pairing,
    Stored,
    Warning,
    pair_instances,
    settle_seg,
)
from pecore.io import dicom_is_lossy, read_dicom

__all__ = ["WAITS_FOR_IMAGE", "WAITS_FOR_SEG", "store_instances"]

# Texts of the warnings (an Error Comment holds 64 characters).
WAITS_FOR_SEG = "stored; searchable once a DICOM SEG references it"
WAITS_FOR_IMAGE = "stored; applied when the image it references comes"
NO_LABEL = "stored without a class label: not a training template"
CORRECTED = "corrected mask: a new version, served once it is searchable"

# The retrieve URL of an uploaded image, from its instance and cloud image id.
RetrieveUrl = Callable[[Instance, str], str]
# Gateway answers that mean "busy or down, retry": out of resources (0xA700) for the PACS.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class _Batch:
    """One batch of instances for one collection (a STOW request, a DIMSE association)."""

    def __init__(
        self,
        encryptor: Encryptor,
        *,
        collection: str,
        label: int | None,
        role: str,
        retrieve_url: RetrieveUrl,
        max_pixels: int,
    ) -> None:
        self.encryptor = encryptor
        self.pending = encryptor.pending
        self.collection = collection
        self.label = label
        self.role = role
        self.retrieve_url = retrieve_url
        self.max_pixels = max_pixels

    # -- the cloud ----------------------------------------------------------------------------
    def _upload(
        self,
        uid: str,
        pixels: np.ndarray,
        mask: np.ndarray,
        *,
        label: int | None,
        role: str,
        lossy: bool,
        version: int = 1,
    ) -> str | tuple[int, str]:
        """Protect and upload one pair: the image's cloud id, or (failure reason, text).

        Version 1 is the image's first upload; a corrected SEG makes version 2, 3, …, each
        under its own pseudonym (so its own cloud id and key)."""
        source = uid if version == 1 else f"{uid}\x00mask-v{version}"
        opaque_id = self.encryptor.opaque_id_for(source)
        try:
            answer = self.encryptor.ingest(
                self.collection,
                pixels,
                mask,
                opaque_id=opaque_id,
                label=label,
                role=role,
                idempotency_key=f"stow-{self.collection}-{opaque_id}",
                lossy=lossy,
            )
        except ValueError as exc:
            return FAILURE_CANNOT_UNDERSTAND, str(exc)
        except GatewayError as exc:
            if exc.status in _RETRY_STATUSES:
                return FAILURE_OUT_OF_RESOURCES, f"cloud unavailable, retry: {exc.detail}"
            return FAILURE_PROCESSING, exc.detail
        return str(answer["image_id"])

    def _image_id(self, uid: str) -> str:
        tenant = self.encryptor._bound_tenant(None)
        return image_id_for(tenant, self.collection, self.encryptor.opaque_id_for(uid))

    def _in_cloud(self, uid: str) -> bool:
        """Whether the cloud holds a record of image `uid` (GatewayError if it cannot say)."""
        try:
            self.encryptor.fetch_record(self.collection, self._image_id(uid))
        except GatewayError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _stored(self, uid: str) -> tuple[Opened, int] | None:
        """The newest version in the cloud of image `uid` (opened and checked) and its number,
        or None if it is not there.

        Raises GatewayError (other than 404) or IntegrityError.
        """
        version = self.pending.version(self.collection, uid) if self.pending else None
        if version is None:
            if not self._in_cloud(uid):
                return None
            return self.encryptor.fetch_plain(self.collection, self._image_id(uid)), 1
        newest = version.candidate or version.current
        return self.encryptor.fetch_plain(self.collection, newest), version.number

    def _correct(self, uid: str, stored: Opened, number: int, mask: SegMask) -> str | tuple:
        """Upload version `number` + 1 of image `uid` with a corrected mask; its cloud id (the
        old version stays served until the new one is searchable), or (reason, text)."""
        role = getattr(stored.record, "role", "template")
        result = self._upload(
            uid,
            stored.image,
            mask.mask,
            label=stored.label,
            role=role,
            lossy=stored.lossy,
            version=number + 1,
        )
        if not isinstance(result, tuple):
            self.pending.add_candidate(
                self.collection, uid, self._image_id(uid), number + 1, result
            )
            if self.encryptor.dicom_refs is not None:
                self.encryptor.dicom_refs.copy(self.collection, self._image_id(uid), result)
        return result

    def _remember(self, instance: Instance, image_id: str) -> None:
        """Keep, at the hospital, which DICOM instance cloud image `image_id` is (viewer links)."""
        ref = DicomRef.of(instance.dataset)
        if self.encryptor.dicom_refs is not None and ref is not None:
            self.encryptor.dicom_refs.put(self.collection, image_id, ref)

    def _label_warning(self, label: int | None, role: str) -> Warning | None:
        return (WARNING_STORED, NO_LABEL) if role == "template" and label is None else None

    def _paired(
        self, instance: Instance, uid: str, result: str | tuple[int, str], warning: Warning | None
    ) -> Stored | Failed:
        if isinstance(result, tuple):
            return (instance.sop_class, uid, *result)
        return (instance.sop_class, uid, self.retrieve_url(instance, result), warning)

    # -- images -------------------------------------------------------------------------------
    def _decode(self, instance: Instance) -> tuple[np.ndarray, bool] | Failed:
        try:
            pixels, dataset = read_dicom(instance.data(), max_pixels=self.max_pixels)
        except ValueError as exc:
            return (instance.sop_class, instance.sop_instance, FAILURE_CANNOT_UNDERSTAND, str(exc))
        return pixels, dicom_is_lossy(dataset)

    def image_with_seg(self, pairing: Pairing) -> Stored | Failed:
        """An image whose SEG came in the same batch."""
        instance, uid = pairing.image, pairing.image.sop_instance
        decoded = self._decode(instance)
        if len(decoded) == 4:
            return decoded  # type: ignore[return-value]
        pixels, lossy = decoded
        label = self.label if self.label is not None else pairing.seg.label
        result = self._upload(
            uid, pixels, pairing.seg.mask, label=label, role=self.role, lossy=lossy
        )
        if not isinstance(result, tuple):
            self._remember(instance, result)
        if not isinstance(result, tuple) and self.pending is not None:
            # Halves of the same pair sent earlier are superseded by this one.
            self.pending.drop(self.collection, "image", uid)
            self.pending.drop(self.collection, "mask", uid)
        return self._paired(instance, uid, result, self._label_warning(label, self.role))

    def image_alone(self, instance: Instance) -> Stored | Failed:
        """An image no SEG of its batch references."""
        uid = instance.sop_instance
        if self.pending is None:
            return (
                instance.sop_class,
                uid,
                FAILURE_PROCESSING,
                "no DICOM SEG tumour mask references this image",
            )
        decoded = self._decode(instance)
        if len(decoded) == 4:
            return decoded  # type: ignore[return-value]
        pixels, lossy = decoded
        with self.pending.locked(self.collection):
            mask = self.pending.mask(self.collection, uid)
            if mask is None:
                try:
                    stored_before = self._in_cloud(uid)
                except GatewayError as exc:
                    return (instance.sop_class, uid, FAILURE_PROCESSING, exc.detail)
                if stored_before:
                    # Re-sent after its pair was stored: nothing to do but note its UIDs (for
                    # each version in the cloud: a corrected SEG's too).
                    version = self.pending.version(self.collection, uid)
                    newer = (version.current, version.candidate) if version else ()
                    for image_id in {self._image_id(uid), *newer} - {None}:
                        self._remember(instance, image_id)
                    url = self.retrieve_url(instance, self._image_id(uid))
                    return (instance.sop_class, uid, url, None)
                self.pending.put_image(
                    self.collection, uid, PendingImage(pixels, self.role, self.label, lossy)
                )
                # The cloud id it will have once its SEG comes (the pending file keeps no UID).
                self._remember(instance, self._image_id(uid))
                return (instance.sop_class, uid, None, (WARNING_STORED, WAITS_FOR_SEG))
        label = self.label if self.label is not None else mask.label
        result = self._upload(uid, pixels, mask.mask, label=label, role=self.role, lossy=lossy)
        if not isinstance(result, tuple):
            self._remember(instance, result)
            self.pending.drop(self.collection, "mask", uid)
        return self._paired(instance, uid, result, self._label_warning(label, self.role))

    # -- SEGs ---------------------------------------------------------------------------------
    def seg_for_image_outside(
        self, seg: Instance, mask: SegMask, uid: str
    ) -> Warning | Failed | None:
        """SEG `seg`'s mask for image `uid`, which is not in the batch: None when their pair is
        stored (now or before), a warning when the mask waits, the SEG's Failed entry when
        refused."""

        def refused(reason: int, text: str) -> Failed:
            return (seg.sop_class, seg.sop_instance, reason, text)

        if self.pending is None:
            return refused(FAILURE_PROCESSING, "SEG source image not stored in this request")
        with self.pending.locked(self.collection):
            waiting = self.pending.image(self.collection, uid)
            if waiting is None:
                try:
                    stored = self._stored(uid)
                except GatewayError as exc:
                    return refused(FAILURE_PROCESSING, exc.detail)
                except IntegrityError as exc:
                    return refused(FAILURE_PROCESSING, f"stored image failed its check: {exc}")
                if stored is None:
                    self.pending.put_mask(self.collection, uid, PendingMask(mask.mask, mask.label))
                    return WARNING_STORED, WAITS_FOR_IMAGE
                opened, number = stored
                held = None if opened.mask is None else np.asarray(opened.mask, dtype=bool)
                if held is not None and held.shape == mask.shape:
                    if np.array_equal(held, mask.mask):
                        return None  # a replay of the SEG already applied
                elif held is not None:
                    return refused(
                        FAILURE_CANNOT_UNDERSTAND,
                        f"SEG of {mask.shape} pixels for an image of {held.shape}",
                    )
                result = self._correct(uid, opened, number, mask)
                if isinstance(result, tuple):
                    return refused(*result)
                return WARNING_STORED, CORRECTED
        label = waiting.label if waiting.label is not None else mask.label
        result = self._upload(
            uid, waiting.pixels, mask.mask, label=label, role=waiting.role, lossy=waiting.lossy
        )
        if isinstance(result, tuple):
            return refused(*result)
        self.pending.drop(self.collection, "image", uid)
        return None


def _failed(entry: Stored | Failed) -> bool:
    """Whether an entry is a failure (its third field is a reason code, not a URL)."""
    return isinstance(entry[2], int)


def store_instances(
    encryptor: Encryptor,
    instances: Sequence[Instance],
    *,
    collection: str,
    label: int | None,
    role: str,
    retrieve_url: RetrieveUrl,
    max_pixels: int,
) -> tuple[list[Stored], list[Failed]]:
    """Store what one batch of DICOM instances holds; the stored and failed entries.

    Parameters
    ----------
    encryptor
        The owner-side operations (its `pending` store keeps halves of pairs).
    instances
        The batch's parts, as `pecbir_encryptor.dicom.read_instance` read them.
    collection
        Where they go.
    label, role
        The label the caller gave (None: each SEG's) and the images' role.
    retrieve_url
        The retrieve URL of an uploaded image, from its instance and cloud id.
    max_pixels
        The largest image decoded.

    Returns
    -------
    tuple of (list of Stored, list of Failed)
        One entry per instance (refused parts without a UID included).

    """
    batch = _Batch(
        encryptor,
        collection=collection,
        label=label,
        role=role,
        retrieve_url=retrieve_url,
        max_pixels=max_pixels,
    )
    plan = pair_instances(instances)
    stored: list[Stored] = []
    failed: list[Failed] = list(plan.refused)
    # The outcome of each image a SEG masks, by the SEG's UID (None: its pair was stored).
    masked: dict[str, list[Warning | Failed | None]] = {}
    for item in plan.images:
        if isinstance(item, tuple):
            failed.append(item)
            continue
        if isinstance(item, Pairing):
            outcome = batch.image_with_seg(item)
            masked.setdefault(item.seg_instance.sop_instance, []).append(
                outcome if _failed(outcome) else None  # type: ignore[arg-type]
            )
        else:
            outcome = batch.image_alone(item)
        (failed if _failed(outcome) else stored).append(outcome)  # type: ignore[arg-type]
    for part in plan.segs:
        outcomes = masked.get(part.instance.sop_instance, [])
        outcomes += [
            batch.seg_for_image_outside(part.instance, part.seg, uid) for uid in part.outside
        ]
        ok, refused = settle_seg(part.instance, outcomes)
        if ok is not None:
            stored.append(ok)
        if refused is not None:
            failed.append(refused)
    return stored, failed
