"""Reading and writing grey images: PNG (8/16-bit), NPY and DICOM (12/16-bit MONOCHROME2).

DICOM input is only ever read for its pixels; nothing of its header is written anywhere by
this module (callers decide what little metadata survives).
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "check_dicom_size",
    "dicom_is_lossy",
    "is_dicom",
    "open_dicom",
    "png_bytes",
    "read_dicom",
    "read_image",
    "read_png",
    "write_image",
]

IMAGE_SUFFIXES = (".png", ".npy", ".dcm", ".dicom")
# Decompression-bomb guard for PNG input: far above any MRI slice (512² or 1024²).
MAX_PIXELS = 4096 * 4096


def is_dicom(head: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(head) >= 132 and head[128:132] == b"DICM"


_DEFLATED = "1.2.840.10008.1.2.1.99"
# Transfer syntaxes that are always lossy (JPEG baseline and extended) and those that may be
# (JPEG-LS near-lossless, JPEG 2000, HTJ2K): the latter are lossy unless the file says
# LossyImageCompression "00".
_ALWAYS_LOSSY = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
_MAYBE_LOSSY = frozenset(
    {"1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}
)
# JPEG-LS: CharLS (pyjpegls) decodes it about 4x faster than libjpeg (bench-dicom), but pydicom
# prefers libjpeg when both are there; asked for by name where it is installed.
_JPEG_LS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})


def _prefer_charls(dataset: object) -> None:
    syntax = str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax not in _JPEG_LS:
        return
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder

    if "pyjpegls" in JPEGLSLosslessDecoder.available_plugins:
        dataset.pixel_array_options(decoding_plugin="pyjpegls")


# Room for the attributes around the pixels when bounding an inflated (deflated) dataset.
_HEADER_ROOM_BYTES = 1 << 20


def _inflates_within(data: bytes, limit: int) -> bool:
    """Whether raw-deflate `data` inflates to at most `limit` bytes (memory: 1 MiB at a time)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, data
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, 1 << 20))
            if total > limit:
                return False
            pending = inflater.unconsumed_tail
    except zlib.error:
        return True  # corrupt: pydicom's own reading says so
    return True


def open_dicom(data: bytes, *, max_pixels: int = MAX_PIXELS) -> object:
    """The pydicom dataset of DICOM Part 10 `data`, its pixels not decoded.

    A dataset in the deflated transfer syntax is inflated only once it is known to inflate to
    no more than an image of `max_pixels` 16-bit pixels (plus 1 MiB of header; a SEG's
    frames are 1-bit): a deflate bomb costs a bounded stream, never its inflated size.

    Raises
    ------
    ValueError
        Not readable DICOM, or a deflated dataset that inflates past the bound.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        stream = io.BytesIO(data)
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
        if str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
            limit = 2 * max_pixels + _HEADER_ROOM_BYTES
            if not _inflates_within(data[stream.tell() :], limit):
                raise ValueError(f"deflated DICOM dataset inflates past {limit} bytes")
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a readable DICOM file: {exc}") from None


def check_dicom_size(dataset: object, *, max_pixels: int = MAX_PIXELS, max_frames: int = 1) -> None:
    """Refuse, from the header alone, pixel data larger than `max_pixels` per frame.

    Rows x Columns x samples must be at most `max_pixels`, frames at most `max_frames` and
    BitsAllocated at most 16, so that decoding (RLE, JPEG, raw) allocates a bounded array.

    Raises
    ------
    ValueError
        Naming the declared size and the limit.
    """
    try:
        rows = int(getattr(dataset, "Rows", 0) or 0)
        columns = int(getattr(dataset, "Columns", 0) or 0)
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
        samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
        bits = int(getattr(dataset, "BitsAllocated", 16) or 16)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"DICOM image size attributes are not numbers: {exc}") from None
    if rows * columns * samples > max_pixels:
        raise ValueError(
            f"DICOM image of {rows}x{columns} pixels exceeds the limit of {max_pixels} pixels"
        )
    if frames > max_frames:
        raise ValueError(f"DICOM object of {frames} frames exceeds the limit of {max_frames}")
    if bits > 16:
        raise ValueError(f"DICOM BitsAllocated = {bits}; expected at most 16")


def dicom_is_lossy(dataset: object) -> bool:
    """Whether a DICOM image's pixels went through lossy compression, now or before.

    True when LossyImageCompression is "01" (at any point in its history, PS3.3 C.7.6.1.1.5),
    when its transfer syntax is JPEG baseline or extended, or when the syntax may be lossy
    (JPEG-LS near-lossless, JPEG 2000, HTJ2K) and the file does not say "00".

    Parameters
    ----------
    dataset
        A pydicom dataset, as `open_dicom` or `read_dicom` return it.
    """
    flag = str(getattr(dataset, "LossyImageCompression", "") or "").strip()
    meta = getattr(dataset, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if flag == "01" or syntax in _ALWAYS_LOSSY:
        return True
    return syntax in _MAYBE_LOSSY and flag != "00"


def read_dicom(
    source: str | os.PathLike[str] | bytes | BinaryIO, *, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, object]:
    """Pixels (2-D integer array) and the pydicom dataset of a single-frame MONOCHROME2 image.

    The image's size is checked from its header (`check_dicom_size`) before any pixel is
    decoded, and a deflated dataset is bounded before it is inflated (`open_dicom`).
    """
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()  # type: ignore[union-attr]
    else:
        data = Path(source).read_bytes()  # type: ignore[arg-type]
    dataset = open_dicom(data, max_pixels=max_pixels)
    if "PixelData" not in dataset:
        raise ValueError("not a readable DICOM image: it has no pixel data")
    photometric = str(getattr(dataset, "PhotometricInterpretation", ""))
    if photometric != "MONOCHROME2":
        raise ValueError(
            f"DICOM PhotometricInterpretation is {photometric or 'missing'}; only MONOCHROME2 "
            "grey images are supported"
        )
    if int(getattr(dataset, "SamplesPerPixel", 1)) != 1:
        raise ValueError("DICOM image has more than one sample per pixel; expected grey")
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) != 1:
        raise ValueError("multi-frame DICOM is not supported; send one slice per instance")
    bits_stored = int(getattr(dataset, "BitsStored", 0))
    if bits_stored not in range(8, 17):
        raise ValueError(f"DICOM BitsStored = {bits_stored}; expected 8 to 16 (e.g. 12 or 16)")
    check_dicom_size(dataset, max_pixels=max_pixels)
    try:
        # pydicom picks the codec of the transfer syntax: its own for the uncompressed,
        # deflated and RLE ones, the pylibjpeg plugins (libjpeg, openjpeg, rle) for JPEG,
        # JPEG-LS, JPEG 2000 and HTJ2K (JPEG-LS: CharLS where installed).
        _prefer_charls(dataset)
        pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for broken or unsupported pixel data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = f" ({syntax.name}, {syntax})" if syntax is not None else ""
        raise ValueError(f"cannot decode DICOM pixel data{name}: {exc}") from None
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"DICOM pixel data has shape {pixels.shape}; expected one 2-D slice")
    # Big-endian syntaxes decode to big-endian arrays; everything downstream wants native.
    return np.asarray(pixels, dtype=pixels.dtype.newbyteorder("=")), dataset


def read_png(source: str | os.PathLike[str] | bytes | BinaryIO) -> np.ndarray:
    """A grey PNG as uint8 or uint16; colour PNGs are refused rather than silently converted."""
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            if image.format != "PNG":
                raise ValueError(f"expected a PNG, got {image.format}")
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(
                    f"PNG of {image.width}×{image.height} pixels exceeds the limit of {MAX_PIXELS}"
                )
            if image.mode not in ("L", "I;16", "I;16B", "I", "1"):
                raise ValueError(f"PNG mode {image.mode} is not a grey image (L or I;16)")
            image.load()
            array = np.array(image)
    except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"not a readable PNG: {exc}") from None
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype.kind in "iu" and array.dtype.itemsize > 1:
        if array.min() < 0 or array.max() > 65535:
            raise ValueError("PNG values out of the 16-bit range")
        array = array.astype(np.uint16)
    return array


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """A 2-D grey image from a .png, .npy or DICOM file (by content for DICOM, else suffix)."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(132)
    if is_dicom(head) or path.suffix.lower() in (".dcm", ".dicom"):
        return read_dicom(path)[0]
    suffix = path.suffix.lower()
    if suffix == ".png":
        return read_png(path)
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path}: not a plain .npy array ({exc})") from None
        if array.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D array, got shape {array.shape}")
        return array
    raise ValueError(f"{path}: unsupported image type {suffix!r}; use .png, .npy or DICOM")


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a 2-D uint8/uint16 image as PNG (no text chunks) or any 2-D array as .npy."""
    path = Path(path)
    suffix = path.suffix.lower()
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if suffix == ".npy":
        np.save(path, image, allow_pickle=False)
    elif suffix == ".png":
        if image.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"PNG output needs uint8 or uint16, got {image.dtype}")
        Image.fromarray(image).save(path, format="PNG")
    else:
        raise ValueError(f"{path}: unsupported output type {suffix!r}; use .png or .npy")
    return path


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8/uint16 2-D image as PNG bytes."""
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG needs a 2-D uint8/uint16 image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
