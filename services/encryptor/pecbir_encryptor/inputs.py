"""Plain inputs from a PACS or a researcher: DICOM, PNG or NPY images; PNG/NPY/SEG masks."""

from __future__ import annotations

import io

import numpy as np

from pecbir_encryptor.dicom import SEG_MAX_FRAMES, SEG_SOP_CLASS, read_seg
from pecore.io import check_dicom_size, is_dicom, open_dicom, read_dicom, read_png

_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Same bound as the cloud's wire format: refuse before decoding (or encrypting) anything bigger.
# The service passes its own (smaller) `max_pixels` setting.
MAX_PIXELS = 4096 * 4096


def _check_size(shape: tuple[int, ...], what: str, max_pixels: int) -> None:
    pixels = 1
    for side in shape:
        pixels *= int(side)
    if pixels > max_pixels:
        raise ValueError(f"{what}: {'x'.join(map(str, shape))} exceeds {max_pixels} pixels")


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


def read_pixels(
    data: bytes, what: str = "image", *, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, str | None]:
    """(2-D pixels, SOP Instance UID if DICOM) from DICOM, PNG or NPY bytes.

    The size is checked against `max_pixels` from the file's header, before any pixel is
    decoded (or inflated).
    """
    if not data:
        raise ValueError(f"{what}: empty file")
    if is_dicom(data[:132]):
        try:
            pixels, dataset = read_dicom(data, max_pixels=max_pixels)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        return pixels, str(getattr(dataset, "SOPInstanceUID", "")) or None
    if data.startswith((_PNG_MAGIC, _NPY_MAGIC)):
        _check_size(_declared_shape(data, what), what, max_pixels)
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


def read_mask(data: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, int | None]:
    """(mask, label from a SEG segment label or None) from PNG, NPY or DICOM SEG bytes."""
    if is_dicom(data[:132]):
        try:
            dataset = open_dicom(data, max_pixels=max_pixels)
            if str(getattr(dataset, "SOPClassUID", "")) != SEG_SOP_CLASS:
                raise ValueError("a DICOM mask must be a Segmentation (SEG) object")
            check_dicom_size(dataset, max_pixels=max_pixels, max_frames=SEG_MAX_FRAMES)
        except ValueError as exc:
            raise ValueError(f"mask: {exc}") from None
        seg = read_seg(dataset)
        return seg.mask, seg.label
    mask, _ = read_pixels(data, "mask", max_pixels=max_pixels)
    return mask, None
