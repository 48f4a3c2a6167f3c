"""DICOM in: STOW-RS request bodies, images and their DICOM SEG tumour masks, STOW responses.

Only pixels (and a SEG's segment label, for the tumour class) are taken from a DICOM object;
every other attribute, patient-identifying or not, stays at the hospital.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom.dataset import Dataset

from pecore.io import check_dicom_size, open_dicom

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# PS3.4 Annex GG / PS3.18 failure reasons used in FailedSOPSequence.
FAILURE_PROCESSING = 0x0110  # processing failure
FAILURE_OUT_OF_RESOURCES = 0xA700  # refused: out of resources (the cloud is busy: retry)
FAILURE_CANNOT_UNDERSTAND = 0xC000  # cannot understand (undecodable, unsupported)
FAILURE_SOP_CLASS_MISMATCH = 0xA900  # data set does not match SOP class / not an image
# Stored, with a warning (class Bxxx, PS3.7 C.3; the Error Comment says which): the image
# waits for its SEG, the SEG for its image, or the image has no class label.
WARNING_STORED = 0xB000
LABELS_BY_NAME = {"meningioma": 1, "glioma": 2, "pituitary": 3}
# Frames a SEG of one slice may have (one per segment): more is refused before decoding.
SEG_MAX_FRAMES = 16


class StowError(ValueError):
    """The request as a whole is not a STOW-RS request we can read (→ 400/415)."""


def _boundary(content_type: str) -> bytes:
    """The boundary of a `multipart/related; type="application/dicom"` Content-Type."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        raise StowError(f"Content-Type must be multipart/related, got {media.strip() or 'none'}")
    values = dict(
        (m.group(1).lower(), m.group(2) if m.group(2) is not None else m.group(3))
        for m in re.finditer(r';?\s*([\w-]+)\s*=\s*(?:"([^"]*)"|([^;\s]+))', ";" + params)
    )
    if values.get("type", "application/dicom").lower() != "application/dicom":
        raise StowError(f'only type="application/dicom" is supported, not {values.get("type")!r}')
    boundary = values.get("boundary")
    if not boundary:
        raise StowError("multipart/related Content-Type lacks a boundary")
    return boundary.encode()


def _find_all(stream: BinaryIO, needle: bytes, chunk: int = 1 << 20) -> list[int]:
    """Offsets of `needle` in `stream`, read `chunk` bytes at a time (memory: one chunk)."""
    positions: list[int] = []
    offset, tail = 0, b""
    while block := stream.read(chunk):
        data = tail + block
        start = 0
        while (found := data.find(needle, start)) != -1:
            positions.append(offset - len(tail) + found)
            start = found + 1
        # Keep less than one needle: a match is never counted twice.
        tail = data[-(len(needle) - 1) :] if len(needle) > 1 else b""
        offset += len(block)
    return positions


@dataclass(frozen=True)
class PartSource:
    """Where one part's bytes are in a spooled body (read when needed, not held).

    Attributes
    ----------
    path
        The spool file.
    offset, length
        The part's bytes in it.
    """

    path: Path
    offset: int
    length: int

    def read(self) -> bytes:
        """The part's bytes."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.length)


def split_multipart_related(
    content_type: str, stream: BinaryIO
) -> list[tuple[dict[str, str], int, int]]:
    """Parts of a `multipart/related; type="application/dicom"` body as (headers, offset,
    length), scanning it 1 MiB at a time (a spooled STOW body is never held whole).

    Parameters
    ----------
    content_type
        The request's Content-Type (its boundary).
    stream
        The body, seekable.

    Raises
    ------
    StowError
        Not multipart/related of DICOM, no boundary, no parts, or a part without headers.
    """
    delimiter = b"--" + _boundary(content_type)
    stream.seek(0)
    positions = _find_all(stream, delimiter)
    parts = []
    for here, following in zip(positions, [*positions[1:], None], strict=True):
        start = here + len(delimiter)
        stream.seek(start)
        head = stream.read(16 * 1024 + 4)
        if head.startswith(b"--") or following is None:
            break  # the closing delimiter (or a last part that was never closed)
        skip = 2 if head.startswith(b"\r\n") else 0
        end_of_head = head.find(b"\r\n\r\n", skip)
        if end_of_head == -1:
            raise StowError("malformed multipart part (no header/body separator)")
        headers = {}
        for line in head[skip:end_of_head].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        offset = start + end_of_head + 4
        length = following - offset
        stream.seek(following - 2)
        if length >= 2 and stream.read(2) == b"\r\n":
            length -= 2
        parts.append((headers, offset, max(length, 0)))
    if not parts:
        raise StowError("multipart body has no parts")
    return parts


def parse_multipart_related(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Parts of a `multipart/related; type="application/dicom"` body as (headers, bytes).

    Parameters
    ----------
    content_type
        The Content-Type (its boundary).
    body
        The whole body.
    """
    return [
        (headers, body[offset : offset + length])
        for headers, offset, length in split_multipart_related(content_type, io.BytesIO(body))
    ]


@dataclass
class Instance:
    """One DICOM object of a STOW request (or of a DIMSE association).

    Attributes
    ----------
    dataset
        Its header; an image read from a spooled body keeps no pixel data (see `data`).
    payload
        Its bytes when held in memory (else `source`).
    sop_class, sop_instance
        Its SOP Class and Instance UIDs.
    error
        (failure reason, text) when it cannot be used.
    source
        Where its bytes are in a spooled body.
    has_pixels
        Whether it carries pixel data.
    """

    dataset: Dataset | None
    payload: bytes = b""
    sop_class: str = ""
    sop_instance: str = ""
    error: tuple[int, str] | None = None
    source: PartSource | None = None
    has_pixels: bool = False

    def data(self) -> bytes:
        """The DICOM file's bytes (read from the spool file when it came spooled)."""
        return self.source.read() if self.source is not None else self.payload


def read_instance(
    payload: bytes, part_type: str, *, max_pixels: int, source: PartSource | None = None
) -> Instance:
    """One part of a STOW request; its declared image size checked against `max_pixels`
    (per frame) before anything is inflated or decoded, as on the single-image path.

    Parameters
    ----------
    payload
        The part's bytes.
    part_type
        The part's Content-Type.
    max_pixels
        Largest image (per frame).
    source
        Where `payload` lies in a spooled body: then an image keeps neither its bytes nor
        its pixel data (they are read again when it is decoded), so that a large push costs
        memory per instance, not per push.
    """
    if part_type and part_type.split(";")[0].strip().lower() != "application/dicom":
        return Instance(None, error=(FAILURE_CANNOT_UNDERSTAND, f"part type {part_type!r}"))
    try:
        dataset = open_dicom(payload, max_pixels=max_pixels)
    except Exception as exc:
        return Instance(None, error=(FAILURE_CANNOT_UNDERSTAND, str(exc)))
    is_seg_object = str(getattr(dataset, "SOPClassUID", "")) == SEG_SOP_CLASS
    try:
        check_dicom_size(
            dataset, max_pixels=max_pixels, max_frames=SEG_MAX_FRAMES if is_seg_object else 1
        )
    except ValueError as exc:
        return Instance(
            None,
            sop_class=str(getattr(dataset, "SOPClassUID", "")),
            sop_instance=str(getattr(dataset, "SOPInstanceUID", "")),
            error=(FAILURE_CANNOT_UNDERSTAND, str(exc)),
        )
    has_pixels = "PixelData" in dataset
    # pydicom keeps the stream it read from (`buffer`): that would hold every part's bytes.
    if hasattr(dataset, "buffer"):
        dataset.buffer = None
    if source is not None:
        # The bytes are read again from the spool file if needed (an image, when decoded).
        # A SEG keeps its 1-bit frames (decoded while pairing); an image keeps no pixels.
        if has_pixels and not is_seg_object:
            del dataset.PixelData
        payload = b""
    return Instance(
        dataset,
        payload=payload,
        sop_class=str(getattr(dataset, "SOPClassUID", "")),
        sop_instance=str(getattr(dataset, "SOPInstanceUID", "")),
        source=source,
        has_pixels=has_pixels,
    )


@dataclass
class SegMask:
    """A SEG's mask (union of its segments, kept bit-packed), its source images, its label."""

    bits: np.ndarray
    shape: tuple[int, int]
    referenced: set[str] = field(default_factory=set)
    label: int | None = None

    @property
    def mask(self) -> np.ndarray:
        """The mask as a 2-D bool array."""
        count = self.shape[0] * self.shape[1]
        return np.unpackbits(self.bits, count=count).reshape(self.shape).astype(bool)


def read_seg(dataset: Dataset) -> SegMask:
    """The union of all segments of a DICOM SEG as one 2-D mask, its source images, its label."""
    try:
        frames = np.asarray(dataset.pixel_array)
    except Exception as exc:
        raise ValueError(f"cannot decode SEG pixel data: {exc}") from None
    # pydicom keeps the decoded frames on the dataset (a byte per pixel); the mask is kept
    # bit-packed instead, so a push of many SEGs costs 1 bit per pixel each, not 8.
    dataset._pixel_array = None
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise ValueError(f"SEG pixel data has shape {frames.shape}; expected frames of one slice")
    mask = frames.astype(bool).any(axis=0)
    referenced: set[str] = set()
    for series in getattr(dataset, "ReferencedSeriesSequence", []):
        for item in getattr(series, "ReferencedInstanceSequence", []):
            referenced.add(str(item.ReferencedSOPInstanceUID))
    for group in getattr(dataset, "PerFrameFunctionalGroupsSequence", []):
        for derivation in getattr(group, "DerivationImageSequence", []):
            for source in getattr(derivation, "SourceImageSequence", []):
                referenced.add(str(source.ReferencedSOPInstanceUID))
    label = None
    for segment in getattr(dataset, "SegmentSequence", []):
        text = str(getattr(segment, "SegmentLabel", "")).strip().lower()
        if text in LABELS_BY_NAME:
            label = LABELS_BY_NAME[text]
        elif text.isdigit():
            label = int(text)
    return SegMask(np.packbits(mask, axis=None), mask.shape, referenced, label)


def is_seg(instance: Instance) -> bool:
    return instance.sop_class == SEG_SOP_CLASS


def _sop_item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class or "1.2.840.10008.5.1.4.1.1.7"
    item.ReferencedSOPInstanceUID = sop_instance or "0"
    return item


def stow_response(
    stored: list[tuple[str, str, str | None, tuple[int, str] | None]],
    failed: list[tuple[str, str, int, str]],
    retrieve_url: str | None = None,
) -> tuple[int, dict]:
    """PS3.18 status and DICOM JSON body: 200 all stored, 202 some failed or stored with a
    warning, 409 none stored.

    `stored`: (SOP class, SOP instance, retrieve URL, (warning reason, text) or None);
    `failed`: (class, instance, reason, text).
    """
    response = Dataset()
    if retrieve_url:
        response.RetrieveURL = retrieve_url
    if stored:
        items = []
        for sop_class, sop_instance, url, warning in stored:
            item = _sop_item(sop_class, sop_instance)
            if url:
                item.RetrieveURL = url
            if warning is not None:
                item.WarningReason = warning[0]
                item.add_new(0x00000902, "LO", warning[1][:64])
            items.append(item)
        response.ReferencedSOPSequence = items
    if failed:
        items = []
        for sop_class, sop_instance, reason, text in failed:
            item = _sop_item(sop_class, sop_instance)
            item.FailureReason = reason
            # Human-readable cause (Error Comment, as in DIMSE status responses).
            item.add_new(0x00000902, "LO", text[:64])
            items.append(item)
        response.FailedSOPSequence = items
    warned = any(entry[3] is not None for entry in stored)
    status = 409 if not stored else 202 if failed or warned else 200
    return status, response.to_json_dict()


def multipart_related(parts: list[bytes], boundary: str) -> tuple[bytes, str]:
    """A `multipart/related; type="application/dicom"` body of DICOM parts, and its type.

    Parameters
    ----------
    parts
        DICOM Part 10 files.
    boundary
        The boundary (must not occur in any part).
    """
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def retrieved_instance(
    pixels: np.ndarray,
    *,
    study: str,
    series: str,
    instance: str,
    lossy: bool,
    derivation: str | None = None,
) -> bytes:
    """One decrypted image as a DICOM Part 10 MR instance (WADO-RS retrieve).

    Only what the hospital can vouch for is in it: the UIDs it was asked for, the pixels, and
    whether they went through lossy compression or a conversion; no patient attribute (the
    encryptor keeps none: the PACS has them).

    Parameters
    ----------
    pixels
        The decrypted 2-D grey image (uint8 or uint16).
    study, series, instance
        Its Study, Series and SOP Instance UIDs.
    lossy
        LossyImageCompression "01".
    derivation
        DerivationDescription (e.g. the pe mode's 8-bit rule).
    """
    import io

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    pixels = np.ascontiguousarray(pixels)
    depth = 8 if pixels.dtype == np.uint8 else 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("retrieved.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = instance
    dataset.StudyInstanceUID = study
    dataset.SeriesInstanceUID = series
    dataset.Modality = "MR"
    dataset.PatientName = ""
    dataset.PatientID = ""
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = depth
    dataset.BitsStored = depth
    dataset.HighBit = depth - 1
    dataset.PixelRepresentation = 0
    if lossy:
        dataset.LossyImageCompression = "01"
    if derivation:
        dataset.DerivationDescription = derivation[:1024]
    dataset.PixelData = pixels.astype(np.uint8 if depth == 8 else np.uint16).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
