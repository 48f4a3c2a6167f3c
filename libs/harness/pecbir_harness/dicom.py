"""Synthetic DICOM for tests and benchmarks: MR images, SEG masks, STOW-RS bodies (pydicom),
and the same images re-encoded by real encoders (DCMTK, GDCM, OpenJPH) in each transfer syntax.

Nothing here is real patient data: every name and id is generated.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ENCODINGS",
    "Encoding",
    "dicom_bytes",
    "encode",
    "make_mr",
    "make_seg",
    "missing_encoders",
    "multipart_related",
    "save_mr",
    "stow_body",
    "synthetic_slice",
]


def synthetic_slice(bits: int = 12, seed: int = 0, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A smooth grey slice with some noise over most of `bits` (compresses like an image).

    Parameters
    ----------
    bits
        Depth: uint8 up to 8 bits, else uint16.
    seed
        Seed of the noise.
    shape
        (rows, columns).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    top = (1 << bits) - 1
    wave = 0.5 + 0.35 * np.sin(xx / 7.0) * np.cos(yy / 9.0)
    noisy = wave * top + rng.normal(0, top / 200, shape)
    return np.clip(noisy, 0, top).astype(np.uint16 if bits > 8 else np.uint8)


def make_mr(
    pixels: np.ndarray, bits_stored: int = 16, photometric: str = "MONOCHROME2"
):  # -> pydicom FileDataset
    """A minimal single-frame grey MR image holding `pixels`, with made-up patient attributes.

    Parameters
    ----------
    pixels
        2-D image; stored as 8-bit when `bits_stored` <= 8, else as 16-bit.
    bits_stored
        BitsStored (HighBit follows).
    photometric
        PhotometricInterpretation (MONOCHROME2 unless a test wants another).
    """
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
    # Values a test can look for in what reaches the cloud (they must never be there).
    dataset.PatientName = "Doe^Jane"
    dataset.PatientID = "PID-0001"
    dataset.PatientBirthDate = "19700101"
    dataset.InstitutionName = "Test Hospital"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    allocated = 8 if bits_stored <= 8 else 16
    dataset.BitsAllocated = allocated
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = 0
    dtype = np.uint8 if allocated == 8 else np.uint16
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
    return dataset


def save_mr(path: Path, pixels: np.ndarray, **kwargs: object) -> Path:
    """`make_mr(pixels, **kwargs)` written to `path` as a DICOM file; the path."""
    make_mr(pixels, **kwargs).save_as(path, enforce_file_format=True)
    return path


@dataclass(frozen=True)
class Encoding:
    """One transfer syntax as a real encoder writes it.

    Attributes
    ----------
    name
        Short name (test ids, benchmark rows).
    syntax
        The transfer syntax UID the encoder writes.
    tool, args
        The encoder's executable and its options (input and output file follow).
    lossless
        Whether decoding gives the input back exactly.
    bits_stored
        Depth of the input the encoder takes (JPEG baseline: 8 bits, else 12).
    """

    name: str
    syntax: str
    tool: str
    args: tuple[str, ...]
    lossless: bool
    bits_stored: int = 12


# What a PACS commonly sends, each written by DCMTK (dcmconv, dcmcrle, dcmcjpeg, dcmcjpls),
# GDCM (gdcmconv: JPEG 2000) or OpenJPH (ojph_compress: HTJ2K, wrapped here): encoders that
# are not this project's, so decoding is tested on what other software writes.
ENCODINGS: tuple[Encoding, ...] = (
    Encoding("explicit-le", "1.2.840.10008.1.2.1", "dcmconv", ("+te",), True),
    Encoding("implicit-le", "1.2.840.10008.1.2", "dcmconv", ("+ti",), True),
    Encoding("explicit-be", "1.2.840.10008.1.2.2", "dcmconv", ("+tb",), True),
    Encoding("deflate", "1.2.840.10008.1.2.1.99", "dcmconv", ("+td",), True),
    Encoding("rle", "1.2.840.10008.1.2.5", "dcmcrle", (), True),
    Encoding("jpeg-baseline", "1.2.840.10008.1.2.4.50", "dcmcjpeg", ("+eb", "+sr"), False, 8),
    Encoding("jpeg-extended", "1.2.840.10008.1.2.4.51", "dcmcjpeg", ("+ee", "+sr"), False),
    Encoding("jpeg-lossless", "1.2.840.10008.1.2.4.57", "dcmcjpeg", ("+el",), True),
    Encoding("jpeg-lossless-sv1", "1.2.840.10008.1.2.4.70", "dcmcjpeg", ("+e1",), True),
    Encoding("jpeg-ls", "1.2.840.10008.1.2.4.80", "dcmcjpls", (), True),
    Encoding("jpeg-ls-near", "1.2.840.10008.1.2.4.81", "dcmcjpls", ("+en",), False),
    Encoding("j2k-lossless", "1.2.840.10008.1.2.4.90", "gdcmconv", ("--j2k",), True),
    Encoding("j2k", "1.2.840.10008.1.2.4.91", "gdcmconv", ("--j2k", "--lossy", "-r", "10"), False),
    Encoding(
        "htj2k-lossless", "1.2.840.10008.1.2.4.201", "ojph_compress", ("-reversible", "true"), True
    ),
)


def missing_encoders(encodings: tuple[Encoding, ...] = ENCODINGS) -> list[str]:
    """The encoders of `encodings` not installed (Debian: dcmtk, libgdcm-tools, openjph-tools)."""
    return sorted({e.tool for e in encodings if shutil.which(e.tool) is None})


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[:500]}")


def _htj2k(dataset, folder: Path, encoding: Encoding) -> bytes:
    """`dataset` with its pixels as one HTJ2K codestream (ojph_compress writes bare .j2c)."""
    from pydicom.encaps import encapsulate

    pixels = np.asarray(dataset.pixel_array)
    depth = int(dataset.BitsStored)
    pgm = folder / "in.pgm"
    header = f"P5 {pixels.shape[1]} {pixels.shape[0]} {(1 << depth) - 1}\n".encode()
    body = pixels.astype(">u2" if depth > 8 else np.uint8).tobytes()  # PGM: big-endian
    pgm.write_bytes(header + body)
    _run([encoding.tool, "-i", str(pgm), "-o", str(folder / "out.j2c"), *encoding.args])
    dataset.PixelData = encapsulate([(folder / "out.j2c").read_bytes()])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = encoding.syntax
    return dicom_bytes(dataset)


def encode(data: bytes, encoding: Encoding) -> bytes:
    """DICOM file `data` (uncompressed) re-encoded by `encoding`'s real encoder.

    Parameters
    ----------
    data
        A DICOM file, e.g. ``dicom_bytes(make_mr(pixels, bits_stored=encoding.bits_stored))``.
    encoding
        One of `ENCODINGS`.

    Returns
    -------
    bytes
        The file the encoder wrote.

    Raises
    ------
    RuntimeError
        The encoder is missing or failed.
    """
    import pydicom

    if shutil.which(encoding.tool) is None:
        raise RuntimeError(f"{encoding.tool} is not installed")
    with tempfile.TemporaryDirectory(prefix="pecbir-encode-") as tmp:
        folder = Path(tmp)
        if encoding.tool == "ojph_compress":
            return _htj2k(pydicom.dcmread(io.BytesIO(data)), folder, encoding)
        (folder / "in.dcm").write_bytes(data)
        _run([encoding.tool, *encoding.args, str(folder / "in.dcm"), str(folder / "out.dcm")])
        return (folder / "out.dcm").read_bytes()


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
