"""Small synthetic DICOM files for tests (pydicom only; nothing real)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def make_dataset(
    pixels: np.ndarray, bits_stored: int = 16, photometric: str = "MONOCHROME2"
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("synthetic.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "MR"
    dataset.PatientName = "Doe^Jane"
    dataset.PatientID = "PID-0001"
    dataset.PatientBirthDate = "19700101"
    dataset.InstitutionName = "Test Hospital"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    return dataset


def make_dicom(path: Path, pixels: np.ndarray, **kwargs: object) -> Path:
    make_dataset(pixels, **kwargs).save_as(path, enforce_file_format=True)
    return path
