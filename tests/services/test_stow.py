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
from pecbir_encryptor.stow import Pairing, pair_instances, seg_outcomes
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
    assert [s.sop_instance for s in plan.segs] == [
        seg_second.SOPInstanceUID,
        seg_first.SOPInstanceUID,
    ]


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
    assert plan.images[1][1:3] == (lonely.SOPInstanceUID, FAILURE_PROCESSING)
    assert plan.images[2][1:3] == (no_pixels.SOPInstanceUID, FAILURE_SOP_CLASS_MISMATCH)
    assert [s.sop_instance for s in plan.segs] == [seg.SOPInstanceUID]


def test_a_seg_is_stored_only_with_one_of_its_images():
    image, mask = image_and_mask(0)
    other, _ = image_and_mask(1)
    used = instance_of(make_seg(mask, image))
    unused = instance_of(make_seg(mask, other))
    stored, failed = seg_outcomes([used, unused], {used.sop_instance})
    assert stored == [(used.sop_class, used.sop_instance, None)]
    assert [(uid, code) for _cls, uid, code, _text in failed] == [
        (unused.sop_instance, FAILURE_PROCESSING)
    ]
