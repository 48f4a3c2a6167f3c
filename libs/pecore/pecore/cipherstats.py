"""Statistics of cipher images: the usual image-encryption figures of merit, measured.

All functions take uint8 2-D images.  They describe the cipher image, not an attack: a flat
histogram or a low neighbour correlation does not by itself mean that nothing leaks (half of
the pixels of "ours" are plain; see `pecore.attacks`).

* `entropy`: Shannon entropy of the 256-bin histogram (8 bits for a flat one);
* `histogram_chi2`: χ² statistic of the histogram against the flat one, and its p-value
  (255 degrees of freedom);
* `adjacent_correlation`: Pearson correlation of all horizontally, vertically and
  diagonally adjacent pixel pairs;
* `npcr_uaci`: number of pixels change rate and unified average changing intensity (in %)
  between two cipher images;
* `expected_npcr_uaci`: their values for two independent uniform images (99.61 %, 33.46 %).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chi2

__all__ = [
    "adjacent_correlation",
    "describe",
    "entropy",
    "expected_npcr_uaci",
    "histogram_chi2",
    "npcr_uaci",
]


def _check(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    return image


def entropy(image: np.ndarray) -> float:
    """Shannon entropy of the grey-level histogram, in bits."""
    counts = np.bincount(_check(image).ravel(), minlength=256)
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log2(probabilities)).sum())


def histogram_chi2(image: np.ndarray) -> tuple[float, float]:
    """(χ² statistic, p-value) of the histogram against the uniform one (df = 255)."""
    counts = np.bincount(_check(image).ravel(), minlength=256).astype(np.float64)
    expected = counts.sum() / 256
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return statistic, float(chi2.sf(statistic, df=255))


def adjacent_correlation(image: np.ndarray) -> dict[str, float]:
    """Pearson correlation of every adjacent pixel pair, per direction."""
    image = _check(image).astype(np.float64)
    pairs = {
        "horizontal": (image[:, :-1], image[:, 1:]),
        "vertical": (image[:-1, :], image[1:, :]),
        "diagonal": (image[:-1, :-1], image[1:, 1:]),
    }
    out = {}
    for direction, (first, second) in pairs.items():
        a = first.ravel() - first.mean()
        b = second.ravel() - second.mean()
        denominator = np.sqrt((a * a).sum() * (b * b).sum())
        out[direction] = float((a * b).sum() / denominator) if denominator > 0 else float("nan")
    return out


def npcr_uaci(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """(NPCR %, UACI %) between two cipher images of the same shape."""
    first, second = _check(first), _check(second)
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {first.shape} vs {second.shape}")
    npcr = 100.0 * float(np.mean(first != second))
    uaci = 100.0 * float(np.mean(np.abs(first.astype(np.int16) - second)) / 255.0)
    return npcr, uaci


def expected_npcr_uaci() -> tuple[float, float]:
    """NPCR/UACI of two independent uniform 8-bit images: 100·255/256 and 100·257/768."""
    return 100.0 * 255 / 256, 100.0 * 257 / 768


def describe(image: np.ndarray) -> dict[str, float]:
    """Entropy, χ² (and p), and the three adjacent correlations of one image."""
    statistic, p_value = histogram_chi2(image)
    correlations = adjacent_correlation(image)
    return {
        "entropy": entropy(image),
        "chi2": statistic,
        "chi2_p": p_value,
        **{f"corr_{direction}": value for direction, value in correlations.items()},
    }
