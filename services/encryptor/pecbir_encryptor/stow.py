"""The image ↔ SEG pairing of a DICOMweb STOW-RS request, as pure functions.

A STOW request carries MR images and DICOM SEG tumour masks in any order, and either half of
a pair may come in another request (`pecbir_encryptor.pending` keeps the first until the
other arrives). `pair_instances` decides, before anything is encrypted or uploaded, which
image of the request goes with which SEG of the same request, which images have none here,
which images each SEG names outside the request, and which parts are refused; `settle_seg`
gives a SEG its answer once each of its images has one. Neither touches keys, the network,
the pending store or the audit log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pecbir_encryptor.dicom import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_PROCESSING,
    FAILURE_SOP_CLASS_MISMATCH,
    SEG_SOP_CLASS,
    Instance,
    SegMask,
    is_seg,
    read_seg,
)

__all__ = [
    "Failed",
    "Pairing",
    "SegPart",
    "Stored",
    "StowPlan",
    "Warning",
    "pair_instances",
    "settle_seg",
]

# (PS3.18 warning reason code, text): why an instance was stored with a warning.
Warning = tuple[int, str]
# (SOP class, SOP instance, retrieve URL or None, warning or None): a stored entry.
Stored = tuple[str, str, str | None, Warning | None]
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
class SegPart:
    """A readable SEG of the request that references at least one image.

    Attributes
    ----------
    instance
        The SEG instance.
    seg
        Its decoded mask, references and label.
    outside
        The images it references that are not in this request (sorted): they came earlier
        (waiting, or already stored) or will come later.
    refused
        The failures of the images it references that this request carried but that were
        refused while reading them (too large, undecodable).
    """

    instance: Instance
    seg: SegMask
    outside: tuple[str, ...]
    refused: tuple[Failed, ...] = ()


@dataclass(frozen=True)
class StowPlan:
    """What to do with each part of a STOW request.

    Attributes
    ----------
    refused
        Parts refused while reading them (undecodable, unsupported, a SEG that cannot be
        read or references no image), in request order.
    images
        One entry per image part, in request order: its `Pairing` with a SEG of this
        request, the `Instance` itself when no SEG of this request references it, or the
        `Failed` entry saying why it cannot be stored (no pixel data).
    segs
        Each SEG that references some image, in request order.
    """

    refused: list[Failed]
    images: list[Pairing | Instance | Failed]
    segs: list[SegPart]


def _sort_parts(
    instances: Sequence[Instance],
) -> tuple[list[Failed], list[tuple[SegMask, Instance]], list[Instance]]:
    """(refused parts, readable SEGs that reference images, image parts), in request order."""
    refused: list[Failed] = []
    segs: list[tuple[SegMask, Instance]] = []
    image_parts: list[Instance] = []
    for instance in instances:
        if instance.error is not None:
            refused.append((instance.sop_class, instance.sop_instance, *instance.error))
        elif is_seg(instance):
            try:
                seg = read_seg(instance.dataset)
            except ValueError as exc:
                refused.append(
                    (instance.sop_class, instance.sop_instance, FAILURE_CANNOT_UNDERSTAND, str(exc))
                )
                continue
            if instance.source is not None and "PixelData" in instance.dataset:
                # Spooled: its mask is in `seg` now (bit-packed); the frames are not needed.
                del instance.dataset.PixelData
            if seg.referenced:
                segs.append((seg, instance))
            else:
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
    return refused, segs, image_parts


def pair_instances(instances: Sequence[Instance]) -> StowPlan:
    """Pair the images of a STOW request with the SEGs of the same request that reference them.

    Parameters
    ----------
    instances
        The request's parts, as read by `pecbir_encryptor.dicom.read_instance`.

    Returns
    -------
    StowPlan
        The refused parts, each image's pairing (or the image alone, or its failure), and
        every SEG with the images it references outside the request. When two SEGs of the
        request reference the same image, the later one masks it.
    """
    refused, segs, image_parts = _sort_parts(instances)
    masks = {uid: (seg, instance) for seg, instance in segs for uid in seg.referenced}
    # Images this request carried, readable or not: a SEG's reference to one is settled here.
    refused_images = {
        entry[1]: entry for entry in refused if entry[1] and entry[0] != SEG_SOP_CLASS
    }
    in_request = {instance.sop_instance for instance in image_parts} | set(refused_images)
    images: list[Pairing | Instance | Failed] = []
    for instance in image_parts:
        uid = instance.sop_instance
        if not instance.has_pixels:
            images.append((instance.sop_class, uid, FAILURE_SOP_CLASS_MISMATCH, "no pixel data"))
        elif uid in masks:
            seg, seg_instance = masks[uid]
            images.append(Pairing(image=instance, seg=seg, seg_instance=seg_instance))
        else:
            images.append(instance)
    parts = [
        SegPart(
            instance,
            seg,
            tuple(sorted(seg.referenced - in_request)),
            tuple(refused_images[uid] for uid in sorted(seg.referenced & set(refused_images))),
        )
        for seg, instance in segs
    ]
    return StowPlan(refused=refused, images=images, segs=parts)


def settle_seg(
    seg: Instance, outcomes: Sequence[Warning | Failed | None]
) -> tuple[Stored | None, Failed | None]:
    """A SEG's entry in the answer, from the outcome for each image it masks.

    Parameters
    ----------
    seg
        The SEG instance.
    outcomes
        For each image it masks (in this request or outside it): None (its pair was stored),
        a `Warning` (stored, with that warning: e.g. the image has not come yet) or a
        `Failed` entry (the image's, or the SEG's own when it was refused for that image).

    Returns
    -------
    tuple of (Stored or None, Failed or None)
        Stored (with the first warning, if any) when at least one of its images was stored
        or it waits for one; failed when none was (or it masks nothing that was sent).
    """
    ok = [o for o in outcomes if o is None or len(o) == 2]
    if ok:
        warning = next((o for o in ok if o is not None), None)
        return (seg.sop_class, seg.sop_instance, None, warning), None
    failures = [o for o in outcomes if o is not None and len(o) == 4]
    if not failures:
        return None, (seg.sop_class, seg.sop_instance, FAILURE_PROCESSING, "no image it masks")
    _cls, uid, reason, text = failures[0]
    if uid != seg.sop_instance:  # its image's failure
        text = f"SEG source image not stored: {text}"
    return None, (seg.sop_class, seg.sop_instance, reason, text)
