"""Local features: dense raw P×P patches of min–max normalised intensities in the ROI, the
training-patch sample, and PCA at a fixed energy (method spec §1.2, §1.4, §3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pecore.roi import dilate_mask, intensity_regions

__all__ = [
    "ImagePatches",
    "PatchPCA",
    "extract_patches",
    "minmax_normalise",
    "roi_patches",
    "training_sample",
]


def minmax_normalise(image: np.ndarray) -> np.ndarray:
    """Per-image min–max normalisation to [0, 1] in float32 over the whole image (§1.2)."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    lo = np.float32(image.min())
    hi = np.float32(image.max())
    out = image.astype(np.float32)
    out -= lo
    if hi > lo:
        out /= hi - lo
    return out


def extract_patches(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """The size×size blocks centred on (rows, cols), flattened row-major: (T, size²).

    Patches that would leave the image use reflect padding (never the case for the figshare data
    with radius 24 and P = 9, where Cheng's code does no bounds check; spec §1.4).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"patch size must be odd and positive, got {size}")
    half = size // 2
    h, w = image.shape
    if rows.size and (
        rows.min() < half or cols.min() < half or rows.max() >= h - half or cols.max() >= w - half
    ):
        image = np.pad(image, half, mode="reflect")
        rows, cols = rows + half, cols + half
    windows = np.lib.stride_tricks.sliding_window_view(image, (size, size))
    return windows[rows - half, cols - half].reshape(rows.size, size * size)


@dataclass(frozen=True)
class ImagePatches:
    """The ROI patches of one image, **sorted by subregion** (stable, so raster order within).

    `patches[bounds[r]:bounds[r + 1]]` are the patches of subregion r (0-based).
    """

    patches: np.ndarray  # float32 (T, P²), normalised intensities
    bounds: np.ndarray  # int64 (R + 1,)

    @property
    def n_regions(self) -> int:
        return self.bounds.size - 1


def roi_patches(
    image: np.ndarray,
    mask: np.ndarray,
    patch_size: int = 9,
    radius: int = 24,
    n_regions: int = 8,
    roi: np.ndarray | None = None,
) -> ImagePatches:
    """All ROI patches of one (plain or cipher) image with their intensity-order subregions.

    `mask` is the plain tumour mask; it is dilated by `radius` unless the dilated ROI is passed
    as `roi` (to reuse it across conditions). Region cut points come from the normalised
    intensities of this image at the ROI pixels, so a cipher image gets its own regions.
    """
    image = np.asarray(image)
    if roi is None:
        roi = dilate_mask(mask, radius)
    if roi.shape != image.shape:
        raise ValueError(f"mask shape {roi.shape} does not match image shape {image.shape}")
    normalised = minmax_normalise(image)
    rows, cols = np.nonzero(roi)
    regions = intensity_regions(normalised[rows, cols], n_regions)
    order = np.argsort(regions, kind="stable")
    patches = extract_patches(normalised, rows[order], cols[order], patch_size)
    bounds = np.searchsorted(regions[order], np.arange(n_regions + 1), side="left")
    return ImagePatches(patches=np.ascontiguousarray(patches), bounds=bounds.astype(np.int64))


def _matlab_round(x: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def training_sample(
    counts: Sequence[int] | np.ndarray,
    n_samples: int,
    rng: np.random.Generator,
    per_image_fraction: float = 0.2,
) -> list[np.ndarray]:
    """Which patches go into the PCA/GMM training sample (spec §3.2), as per-image index arrays.

    Each image contributes a random `round(m_i/5)` of its m_i patches (without replacement); the
    pooled set is then subsampled uniformly to `n_samples` (without replacement; all of it if
    smaller). Only indices are drawn, so the pool is never materialised. Returns, for each image,
    the sorted positions (into that image's patch array) that were selected.
    """
    counts = np.asarray(counts, dtype=np.int64)
    per_image = [
        np.sort(rng.choice(int(m), size=int(k), replace=False))
        for m, k in zip(counts, _matlab_round(counts * per_image_fraction), strict=True)
    ]
    sizes = np.array([p.size for p in per_image], dtype=np.int64)
    total = int(sizes.sum())
    if total > n_samples:
        chosen = np.sort(rng.choice(total, size=n_samples, replace=False))
    else:
        chosen = np.arange(total)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    cuts = np.searchsorted(
        chosen, offsets
    )  # chosen is sorted: image i owns chosen[cuts[i]:cuts[i+1]]
    return [per_image[i][chosen[cuts[i] : cuts[i + 1]] - offsets[i]] for i in range(len(per_image))]


class PatchPCA:
    """PCA keeping the fewest leading components whose cumulative energy is ≥ `energy` (§3.3)."""

    def __init__(self, energy: float = 0.99) -> None:
        self.energy = energy

    def fit(self, X: np.ndarray) -> PatchPCA:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] < 2:
            raise ValueError(f"need a 2-D sample with at least 2 rows, got shape {X.shape}")
        self.mean_ = X.mean(axis=0)
        centred = X - self.mean_
        covariance = centred.T @ centred / (X.shape[0] - 1)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues = np.clip(eigenvalues[order], 0.0, None)
        eigenvectors = eigenvectors[:, order]
        # fix the sign of each axis (largest |loading| positive) so results are reproducible
        signs = np.sign(eigenvectors[np.abs(eigenvectors).argmax(axis=0), np.arange(X.shape[1])])
        eigenvectors *= np.where(signs == 0, 1.0, signs)
        ratio = eigenvalues / eigenvalues.sum()
        n_keep = int(np.searchsorted(np.cumsum(ratio), self.energy - 1e-12) + 1)
        n_keep = min(n_keep, X.shape[1])
        self.n_components_ = n_keep
        self.components_ = eigenvectors[:, :n_keep].T.copy()  # (Dp, P²)
        self.explained_variance_ = eigenvalues[:n_keep]
        self.explained_variance_ratio_ = ratio[:n_keep]
        self._projection = self.components_.T.astype(np.float32)
        self._offset = (self.mean_ @ self.components_.T).astype(np.float32)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """y = Wᵀ(x − m), float32 (T, Dp)."""
        out = np.asarray(X, dtype=np.float32) @ self._projection
        out -= self._offset
        return out

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean_,
            "components": self.components_,
            "variance": self.explained_variance_,
            "ratio": self.explained_variance_ratio_,
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], energy: float) -> PatchPCA:
        pca = cls(energy)
        pca.mean_ = np.asarray(state["mean"], dtype=np.float64)
        pca.components_ = np.asarray(state["components"], dtype=np.float64)
        pca.explained_variance_ = np.asarray(state["variance"], dtype=np.float64)
        pca.explained_variance_ratio_ = np.asarray(state["ratio"], dtype=np.float64)
        pca.n_components_ = pca.components_.shape[0]
        pca._projection = pca.components_.T.astype(np.float32)
        pca._offset = (pca.mean_ @ pca.components_.T).astype(np.float32)
        return pca
