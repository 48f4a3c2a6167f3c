"""The image ↔ SEG pairing of a STOW request, on its own (no keys, no network, no app)."""

from __future__ import annotations

import numpy as np

from pecbir_encryptor.dicom import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_PROCESSING,
    FAILURE_SOP_CLASS_MISMATCH,
    Instance,
    read_instance,
)
from pecbir_encryptor.stow import Pairing, pair_instances, settle_seg
from pecbir_harness.dicom import make_mr
from pecore.io import MAX_PIXELS
from tests.services.helpers import dicom_bytes, make_seg


def instance_of(dataset) -> Instance:
    return read_instance(dicom_bytes(dataset), "application/dicom", max_pixels=MAX_PIXELS)


def image_and_mask(seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, (16, 16)).astype(np.uint16)
    mask = np.zeros((16, 16), bool)
    mask[4:9, 5:11] = True
    return make_mr(pixels, bits_stored=12), mask


def test_each_image_gets_the_seg_that_references_it_whatever_the_order():
    first, first_mask = image_and_mask(0)
    second, second_mask = image_and_mask(1)
    seg_first = make_seg(first_mask, first, label="glioma")
    seg_second = make_seg(second_mask, second, label="meningioma")
    parts = [instance_of(d) for d in (seg_second, first, seg_first, second)]
    plan = pair_instances(parts)
    assert plan.refused == []
    assert all(isinstance(item, Pairing) for item in plan.images)
    paired = {item.image.sop_instance: item for item in plan.images}
    assert list(paired) == [first.SOPInstanceUID, second.SOPInstanceUID]  # request order
    assert paired[first.SOPInstanceUID].seg_instance.sop_instance == seg_first.SOPInstanceUID
    assert paired[second.SOPInstanceUID].seg.label == 1  # "meningioma"
    np.testing.assert_array_equal(paired[first.SOPInstanceUID].seg.mask, first_mask)
    assert [s.instance.sop_instance for s in plan.segs] == [
        seg_second.SOPInstanceUID,
        seg_first.SOPInstanceUID,
    ]
    assert all(s.outside == () for s in plan.segs)  # both images are in the request


def test_unpaired_images_unreadable_parts_and_empty_segs_are_reported():
    paired, mask = image_and_mask(0)
    lonely, _ = image_and_mask(1)
    no_pixels, _ = image_and_mask(2)
    del no_pixels.PixelData
    seg = make_seg(mask, paired)
    orphan = make_seg(mask, paired)
    del orphan.ReferencedSeriesSequence
    parts = [
        instance_of(paired),
        instance_of(lonely),
        instance_of(no_pixels),
        instance_of(seg),
        instance_of(orphan),
        read_instance(b"not dicom", "application/dicom", max_pixels=MAX_PIXELS),
        read_instance(b"", "text/plain", max_pixels=MAX_PIXELS),
    ]
    plan = pair_instances(parts)
    refused = {(uid, code) for _cls, uid, code, _text in plan.refused}
    assert (orphan.SOPInstanceUID, FAILURE_PROCESSING) in refused
    assert [code for _cls, uid, code, _text in plan.refused if not uid] == [
        FAILURE_CANNOT_UNDERSTAND,
        FAILURE_CANNOT_UNDERSTAND,
    ]
    assert isinstance(plan.images[0], Pairing)
    assert isinstance(plan.images[1], Instance)  # no SEG here: it may wait for one
    assert plan.images[1].sop_instance == lonely.SOPInstanceUID
    assert plan.images[2][1:3] == (no_pixels.SOPInstanceUID, FAILURE_SOP_CLASS_MISMATCH)
    assert [s.instance.sop_instance for s in plan.segs] == [seg.SOPInstanceUID]


def test_a_seg_names_the_images_outside_its_request():
    image, mask = image_and_mask(0)
    later, _ = image_and_mask(1)
    seg = make_seg(mask, image)
    seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence.append(
        make_seg(mask, later).ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    )
    plan = pair_instances([instance_of(image), instance_of(seg)])
    assert isinstance(plan.images[0], Pairing)
    assert plan.segs[0].outside == (later.SOPInstanceUID,)


def test_a_seg_is_stored_when_one_of_its_images_is_or_waits():
    image, mask = image_and_mask(0)
    seg = instance_of(make_seg(mask, image))
    image_failed = (image.SOPClassUID, image.SOPInstanceUID, FAILURE_PROCESSING, "gateway down")
    waits = (0xB000, "waits")
    assert settle_seg(seg, [None]) == ((seg.sop_class, seg.sop_instance, None, None), None)
    assert settle_seg(seg, [image_failed, waits]) == (
        (seg.sop_class, seg.sop_instance, None, waits),
        None,
    )
    stored, failed = settle_seg(seg, [image_failed])
    assert stored is None
    assert failed[1:3] == (seg.sop_instance, FAILURE_PROCESSING)
    assert failed[3] == "SEG source image not stored: gateway down"
    own = (seg.sop_class, seg.sop_instance, FAILURE_PROCESSING, "corrected SEG")
    assert settle_seg(seg, [own]) == (None, own)  # its own refusal, as it is
