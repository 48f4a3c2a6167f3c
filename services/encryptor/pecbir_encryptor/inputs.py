"""Plain inputs from a PACS or a researcher: DICOM, PNG or NPY images; PNG/NPY/SEG masks."""

from __future__ import annotations

import io

import numpy as np

from pecbir_encryptor.dicom import SEG_SOP_CLASS, read_seg
from pecore.io import is_dicom, read_dicom, read_png

_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_pixels(data: bytes, what: str = "image") -> tuple[np.ndarray, str | None]:
    """(2-D pixels, SOP Instance UID if DICOM) from DICOM, PNG or NPY bytes."""
    if not data:
        raise ValueError(f"{what}: empty file")
    if is_dicom(data[:132]):
        pixels, dataset = read_dicom(data)
        return pixels, str(getattr(dataset, "SOPInstanceUID", "")) or None
    if data.startswith(_PNG_MAGIC):
        return read_png(data), None
    if data.startswith(_NPY_MAGIC):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{what}: not a plain .npy array ({exc})") from None
        if array.ndim != 2:
            raise ValueError(f"{what}: expected a 2-D array, got shape {array.shape}")
        return array, None
    raise ValueError(f"{what}: not DICOM, PNG or NPY")


def read_mask(data: bytes) -> tuple[np.ndarray, int | None]:
    """(mask, label from a SEG segment label or None) from PNG, NPY or DICOM SEG bytes."""
    if is_dicom(data[:132]):
        import pydicom

        dataset = pydicom.dcmread(io.BytesIO(data))
        if str(getattr(dataset, "SOPClassUID", "")) != SEG_SOP_CLASS:
            raise ValueError("mask: a DICOM mask must be a Segmentation (SEG) object")
        seg = read_seg(dataset)
        return seg.mask, seg.label
    mask, _ = read_pixels(data, "mask")
    return mask, None
