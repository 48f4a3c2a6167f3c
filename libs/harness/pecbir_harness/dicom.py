"""Synthetic DICOM for tests and benchmarks: MR images, SEG masks, STOW-RS bodies (pydicom).

Nothing here is real patient data: every name and id is generated.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["dicom_bytes", "make_mr", "make_seg", "multipart_related", "stow_body"]


def make_mr(pixels: np.ndarray):  # -> pydicom FileDataset
    """A minimal single-frame MONOCHROME2 MR image holding `pixels` (uint16)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("mr.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "MR"
    dataset.PatientName = "Synthetic^Patient"
    dataset.PatientID = "SYN-0001"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return dataset


def make_seg(mask: np.ndarray, source, label: str = "glioma"):
    """A minimal DICOM SEG (binary, one frame) whose segment covers `mask` on `source`."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    seg_class = "1.2.840.10008.5.1.4.1.1.66.4"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = seg_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    seg = FileDataset("seg.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    seg.SOPClassUID = seg_class
    seg.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    seg.StudyInstanceUID = source.StudyInstanceUID
    seg.SeriesInstanceUID = generate_uid()
    seg.PatientName = source.PatientName
    seg.PatientID = source.PatientID
    seg.Modality = "SEG"
    seg.SegmentationType = "BINARY"
    seg.Rows, seg.Columns = mask.shape
    seg.NumberOfFrames = 1
    seg.SamplesPerPixel = 1
    seg.PhotometricInterpretation = "MONOCHROME2"
    seg.BitsAllocated = 1
    seg.BitsStored = 1
    seg.HighBit = 0
    seg.PixelRepresentation = 0
    seg.PixelData = pack_bits(mask.astype(np.uint8))
    segment = Dataset()
    segment.SegmentNumber = 1
    segment.SegmentLabel = label
    seg.SegmentSequence = [segment]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedInstanceSequence = [reference]
    seg.ReferencedSeriesSequence = [series]
    return seg


def dicom_bytes(dataset) -> bytes:
    """The dataset as a DICOM file (with its preamble and file meta)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart_related(
    parts: list[bytes], boundary: str = "pecbir-test-boundary"
) -> tuple[bytes, str]:
    """A STOW-RS request body of DICOM parts, and its Content-Type."""
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow_body(
    images: list[np.ndarray], masks: list[np.ndarray], labels: list[str]
) -> tuple[bytes, str]:
    """One STOW-RS body: an MR image and the SEG of its mask (segment label) per image."""
    parts = []
    for pixels, mask, label in zip(images, masks, labels, strict=True):
        image = make_mr(pixels)
        parts += [dicom_bytes(image), dicom_bytes(make_seg(mask, image, label=label))]
    return multipart_related(parts)
