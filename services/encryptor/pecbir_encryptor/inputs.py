"""Plain inputs from a PACS or a researcher: DICOM, PNG or NPY images; PNG/NPY/SEG masks."""

from __future__ import annotations

import io

import numpy as np

from pecbir_encryptor.dicom import SEG_SOP_CLASS, read_seg
from pecore.io import is_dicom, read_dicom, read_png

_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Same bound as the cloud's wire format: refuse before decoding (or encrypting) anything bigger.
MAX_PIXELS = 4096 * 4096


def _check_size(shape: tuple[int, ...], what: str) -> None:
    pixels = 1
    for side in shape:
        pixels *= int(side)
    if pixels > MAX_PIXELS:
        raise ValueError(f"{what}: {'x'.join(map(str, shape))} exceeds {MAX_PIXELS} pixels")


def _declared_shape(data: bytes, what: str) -> tuple[int, ...]:
    """The shape a PNG or .npy file declares in its header, read before any pixel."""
    if data.startswith(_PNG_MAGIC):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                return (image.size[1], image.size[0])
        except Exception as exc:  # PIL raises many types for corrupt headers
            raise ValueError(f"{what}: not a readable PNG ({exc})") from None
    stream = io.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, _, _ = read_header(stream)
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ValueError(f"{what}: not a plain .npy array ({exc})") from None
    return tuple(shape)


def read_pixels(data: bytes, what: str = "image") -> tuple[np.ndarray, str | None]:
    """(2-D pixels, SOP Instance UID if DICOM) from DICOM, PNG or NPY bytes."""
    if not data:
        raise ValueError(f"{what}: empty file")
    if is_dicom(data[:132]):
        pixels, dataset = read_dicom(data)
        _check_size(pixels.shape, what)
        return pixels, str(getattr(dataset, "SOPInstanceUID", "")) or None
    if data.startswith((_PNG_MAGIC, _NPY_MAGIC)):
        _check_size(_declared_shape(data, what), what)
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
