"""The image ↔ SEG pairing of a DICOMweb STOW-RS request, as pure functions.

A STOW request carries MR images and DICOM SEG tumour masks in any order. An image can be
stored only with a SEG that references it; a SEG counts as stored only when an image it
references was. `pair_instances` decides, before anything is encrypted or uploaded, which
image goes with which SEG and which parts are refused; `seg_outcomes` settles the SEGs once
the uploads are done. Neither touches keys, the network or the audit log.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from pecbir_encryptor.dicom import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_PROCESSING,
    FAILURE_SOP_CLASS_MISMATCH,
    Instance,
    SegMask,
    is_seg,
    read_seg,
)

__all__ = ["Failed", "Pairing", "Stored", "StowPlan", "pair_instances", "seg_outcomes"]

# (SOP class, SOP instance, retrieve URL or None): a stored entry of the STOW response.
Stored = tuple[str, str, str | None]
# (SOP class, SOP instance, PS3.18 failure reason code, text): a failed entry.
Failed = tuple[str, str, int, str]


@dataclass(frozen=True)
class Pairing:
    """An image of the request with the SEG that masks it.

    Attributes
    ----------
    image
        The image instance (it has pixel data).
    seg
        The decoded SEG mask (union of its segments), its references and label.
    seg_instance
        The SEG instance `seg` was read from.
    """

    image: Instance
    seg: SegMask
    seg_instance: Instance


@dataclass(frozen=True)
class StowPlan:
    """What to do with each part of a STOW request.

    Attributes
    ----------
    refused
        Parts refused while reading them (undecodable, unsupported, a SEG that cannot be
        read or references no image), in request order.
    images
        One entry per image part, in request order: its `Pairing`, or the `Failed` entry
        saying why it cannot be stored (no pixel data, no SEG references it).
    segs
        Each SEG instance that masks some image, once, in the order of its first reference.
    """

    refused: list[Failed]
    images: list[Pairing | Failed]
    segs: list[Instance]


def _sort_parts(
    instances: Sequence[Instance],
) -> tuple[list[Failed], dict[str, tuple[SegMask, Instance]], list[Instance]]:
    """(refused parts, SEG of each referenced image UID, image parts), in request order."""
    refused: list[Failed] = []
    masks: dict[str, tuple[SegMask, Instance]] = {}
    image_parts: list[Instance] = []
    for instance in instances:
        if instance.error is not None:
            refused.append(("", "", *instance.error))
        elif is_seg(instance):
            try:
                seg = read_seg(instance.dataset)
            except ValueError as exc:
                refused.append(
                    (instance.sop_class, instance.sop_instance, FAILURE_CANNOT_UNDERSTAND, str(exc))
                )
                continue
            for uid in seg.referenced:
                masks[uid] = (seg, instance)
            if not seg.referenced:
                refused.append(
                    (
                        instance.sop_class,
                        instance.sop_instance,
                        FAILURE_PROCESSING,
                        "SEG references no source image",
                    )
                )
        else:
            image_parts.append(instance)
    return refused, masks, image_parts


def pair_instances(instances: Sequence[Instance]) -> StowPlan:
    """Pair the images of a STOW request with the SEGs that reference them.

    Parameters
    ----------
    instances
        The request's parts, as read by `pecbir_encryptor.dicom.read_instance`.

    Returns
    -------
    StowPlan
        The refused parts, each image's pairing or failure, and the SEGs in use. When two
        SEGs reference the same image, the later one masks it.
    """
    refused, masks, image_parts = _sort_parts(instances)
    images: list[Pairing | Failed] = []
    for instance in image_parts:
        uid = instance.sop_instance
        if "PixelData" not in instance.dataset:
            images.append((instance.sop_class, uid, FAILURE_SOP_CLASS_MISMATCH, "no pixel data"))
        elif uid not in masks:
            images.append(
                (
                    instance.sop_class,
                    uid,
                    FAILURE_PROCESSING,
                    "no DICOM SEG tumour mask references this image",
                )
            )
        else:
            seg, seg_instance = masks[uid]
            images.append(Pairing(image=instance, seg=seg, seg_instance=seg_instance))
    # One entry per SEG instance (it may reference several images), first reference first.
    segs = {id(seg_instance): seg_instance for _seg, seg_instance in masks.values()}
    return StowPlan(refused=refused, images=images, segs=list(segs.values()))


def seg_outcomes(
    segs: Sequence[Instance], stored_seg_uids: Collection[str]
) -> tuple[list[Stored], list[Failed]]:
    """Stored and failed entries of the SEGs, once the images have been uploaded.

    Parameters
    ----------
    segs
        `StowPlan.segs`.
    stored_seg_uids
        SOP Instance UIDs of the SEGs whose image (at least one) was stored.

    Returns
    -------
    tuple of (list of Stored, list of Failed)
        A SEG is stored (without a retrieve URL) when one of its images was, else failed.
    """
    stored: list[Stored] = []
    failed: list[Failed] = []
    for seg_instance in segs:
        if seg_instance.sop_instance in stored_seg_uids:
            stored.append((seg_instance.sop_class, seg_instance.sop_instance, None))
        else:
            failed.append(
                (
                    seg_instance.sop_class,
                    seg_instance.sop_instance,
                    FAILURE_PROCESSING,
                    "SEG source image not stored in this request",
                )
            )
    return stored, failed
