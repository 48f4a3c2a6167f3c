"""Datasets: the figshare brain-tumour set (Cheng et al.) and small synthetic stand-ins for tests.

A `Dataset` holds plain numpy arrays only: images (uint8, N×H×W), tumour masks (bool, N×H×W,
*undilated*), labels (1..3), patient ids, reference folds (1..5) and the original file index.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "Dataset",
    "default_data_path",
    "load_figshare",
    "make_synthetic",
    "read_fold_file",
]

#: Label value -> class name (figshare labels are 1-based).
CLASS_NAMES: dict[int, str] = {1: "meningioma", 2: "glioma", 3: "pituitary"}

DATA_FILE_NAME = "brain_tumor_cheng2017.h5"


@dataclass(frozen=True)
class Dataset:
    """Images with tumour masks, labels, patient ids and a patient-disjoint fold split."""

    images: np.ndarray  # uint8 (N, H, W)
    masks: np.ndarray  # bool (N, H, W), plain (undilated) tumour masks
    labels: np.ndarray  # int64 (N,), 1..n_classes
    pids: np.ndarray  # str (N,)
    folds: np.ndarray  # int64 (N,), 1..n_folds
    index: np.ndarray  # int64 (N,), original file number (1-based for figshare)

    def __post_init__(self) -> None:
        n = len(self.images)
        for name in ("masks", "labels", "pids", "folds", "index"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Dataset.{name} has {len(getattr(self, name))} rows, expected {n}"
                )

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, rows: Sequence[int] | np.ndarray) -> Dataset:
        """A new Dataset with the given rows (indices or boolean mask)."""
        rows = np.asarray(rows)
        return Dataset(
            images=self.images[rows],
            masks=self.masks[rows],
            labels=self.labels[rows],
            pids=self.pids[rows],
            folds=self.folds[rows],
            index=self.index[rows],
        )

    def check_patient_disjoint(self) -> None:
        """Raise ValueError unless every patient id lies in exactly one fold."""
        _, inverse = np.unique(self.pids, return_inverse=True)
        fold_of_pid = np.zeros(inverse.max() + 1, dtype=np.int64)
        fold_of_pid[inverse] = self.folds  # any one of the patient's folds
        mismatched = self.folds != fold_of_pid[inverse]
        if mismatched.any():
            bad = sorted(set(self.pids[mismatched].tolist()))
            raise ValueError(f"patients in more than one fold: {bad[:10]}")


def default_data_path() -> Path:
    """`$PECBIR_DATA`, else `<repo>/../shared/data/brain_tumor_cheng2017.h5`."""
    env = os.environ.get("PECBIR_DATA")
    if env:
        path = Path(env)
        return path / DATA_FILE_NAME if path.is_dir() else path
    repo_root = Path(__file__).resolve().parents[3]
    return repo_root.parent / "shared" / "data" / DATA_FILE_NAME


def decode_webp(blob: np.ndarray) -> np.ndarray:
    """One lossless WebP row of `images_webp` as a uint8 grey image."""
    from PIL import Image

    with Image.open(io.BytesIO(blob.tobytes())) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def load_figshare(
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    n_threads: int = 2,
    limit: int | None = None,
) -> Dataset:
    """Load the compact figshare copy (see shared/data/README.md).

    Decoding the 3064 WebP images takes ~12 s on two cores; with `cache_dir` the decoded stack is
    kept as an `.npy` file and memory-mapped on later calls (read-only).
    `limit` keeps only the first `limit` rows (quick looks, benchmarks; no cache then).
    Raises FileNotFoundError if the file is missing, ValueError if the split is not
    patient-disjoint.
    """
    import h5py

    path = Path(path) if path is not None else default_data_path()
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} (set PECBIR_DATA)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    rows = slice(None) if limit is None else slice(0, limit)
    with h5py.File(path, "r") as f:
        labels = f["labels"][rows].astype(np.int64)
        folds = f["cvind5fold"][rows].astype(np.int64)
        pids = f["pids"][rows].astype(str)
        index = f["index"][rows].astype(np.int64)
        masks = np.unpackbits(f["masks_packed"][rows], axis=-1).astype(bool)
        images = None
        cache_file = None
        if cache_dir is not None and limit is None:
            stat = path.stat()
            cache_file = (
                Path(cache_dir) / f"figshare_images_{stat.st_size}_{int(stat.st_mtime)}.npy"
            )
            if cache_file.is_file():
                images = np.load(cache_file, mmap_mode="r")
        if images is None:
            blobs = f["images_webp"][rows]
            with ThreadPoolExecutor(max(1, n_threads)) as pool:
                images = np.stack(list(pool.map(decode_webp, blobs)))
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(".tmp.npy")
                np.save(tmp, images)
                tmp.replace(cache_file)
    if images.shape != masks.shape:
        raise ValueError(f"image stack {images.shape} does not match masks {masks.shape}")
    data = Dataset(images=images, masks=masks, labels=labels, pids=pids, folds=folds, index=index)
    data.check_patient_disjoint()
    return data


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-12)


def make_synthetic(
    n_images: int = 60,
    size: int = 64,
    seed: int = 0,
    n_folds: int = 5,
    images_per_patient: int = 3,
) -> Dataset:
    """Synthetic 'MRI slices' with a tumour whose texture depends on its class (labels 1..3).

    Class 1: bright, smooth, homogeneous blob. Class 2: ring (bright rim, dark necrotic core) with
    coarse noise. Class 3: fine stripes. Tumours sit near the centre so that the ROI dilated by a
    small radius (≤ size/8) plus a 9×9 patch never leaves the image. Consecutive images share a fake
    patient; patients are dealt to folds round-robin, so the split is patient-disjoint.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    n_patients = -(-n_images // images_per_patient)
    patient_labels = 1 + (np.arange(n_patients) % 3)
    rng.shuffle(patient_labels)
    patient_folds = 1 + (np.arange(n_patients) % n_folds)
    rng.shuffle(patient_folds)
    images = np.empty((n_images, size, size), dtype=np.uint8)
    masks = np.empty((n_images, size, size), dtype=bool)
    labels = np.empty(n_images, dtype=np.int64)
    pids = np.empty(n_images, dtype=object)
    folds = np.empty(n_images, dtype=np.int64)
    centre = size / 2
    for i in range(n_images):
        patient = i // images_per_patient
        label = int(patient_labels[patient])
        brain = np.exp(-(((yy - centre) ** 2 + (xx - centre) ** 2) / (2 * (0.35 * size) ** 2)))
        background = 0.35 * brain + 0.05 * _smooth_noise(rng, (size, size), 2.0)
        cy = centre + rng.uniform(-size / 10, size / 10)
        cx = centre + rng.uniform(-size / 10, size / 10)
        ry, rx = rng.uniform(size / 10, size / 7, 2)
        radius = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        mask = radius <= 1.0
        if label == 1:
            tumour = 0.75 + 0.03 * _smooth_noise(rng, (size, size), 3.0)
        elif label == 2:
            rim = np.exp(-(((radius - 0.85) / 0.15) ** 2))
            tumour = 0.15 + 0.7 * rim + 0.12 * _smooth_noise(rng, (size, size), 1.0)
        else:
            angle = rng.uniform(0, np.pi)
            phase = np.cos(angle) * xx + np.sin(angle) * yy
            tumour = 0.5 + 0.25 * np.sin(2 * np.pi * phase / 4.0)
        image = np.where(mask, tumour, background) + 0.02 * rng.standard_normal((size, size))
        image = (image - image.min()) / (image.max() - image.min())
        images[i] = np.floor(255 * image + 0.5).astype(np.uint8)
        masks[i] = mask
        labels[i] = label
        pids[i] = f"SYN{seed:03d}-{patient:04d}"
        folds[i] = patient_folds[patient]
    return Dataset(
        images=images,
        masks=masks,
        labels=labels,
        pids=pids.astype(str),
        folds=folds,
        index=np.arange(1, n_images + 1, dtype=np.int64),
    )


def read_fold_file(path: str | os.PathLike[str], index: np.ndarray) -> np.ndarray:
    """Folds of the images with file numbers `index`, from a CSV with columns ``index,fold``.

    Parameters
    ----------
    path : str or os.PathLike
        CSV file with a header naming the columns ``index`` (figshare file number, 1..3064)
        and ``fold``; other columns are ignored.
    index : numpy.ndarray
        File numbers of the images, in dataset order (`Dataset.index`).

    Returns
    -------
    numpy.ndarray
        int64 fold of every image, aligned with `index`.

    Raises
    ------
    FileNotFoundError
        If `path` is not a file.
    ValueError
        If the header lacks a column, a row does not parse, or an image has no fold.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fold file not found: {path}")
    mapping: dict[int, int] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"index", "fold"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with columns 'index' and 'fold'")
        for line, row in enumerate(reader, start=2):
            try:
                mapping[int(row["index"])] = int(row["fold"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: bad row {row}") from exc
    missing = [int(i) for i in index if int(i) not in mapping]
    if missing:
        raise ValueError(f"{path}: no fold for {len(missing)} images, e.g. index {missing[:5]}")
    return np.array([mapping[int(i)] for i in index], dtype=np.int64)
