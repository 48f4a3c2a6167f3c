"""Region of interest: the tumour mask dilated by a Euclidean disk, and its intensity-order
subregions (method spec §1.3 and §2.1).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["dilate_mask", "hazen_quantiles", "intensity_regions"]


def dilate_mask(mask: np.ndarray, radius: int = 24) -> np.ndarray:
    """Binary dilation of `mask` by the flat disk {(dy, dx): dy² + dx² ≤ radius²}.

    Equal to MATLAB `imdilate(mask, strel('disk', radius, 0))` and to `skimage.morphology.disk`
    dilation, computed through the exact Euclidean distance transform on the mask's bounding box
    (fast for radius 24, where a direct dilation with a 49×49 element is slow). A pixel is in the
    result iff some mask pixel lies within Euclidean distance `radius`; sqrt of an integer ≤ r² is
    ≤ r exactly when the integer is ≤ r², so the float comparison is exact.

    Parameters
    ----------
    mask : array_like of shape (height, width)
        The tumour mask; any dtype, non-zero means inside.
    radius : int, default=24
        Radius of the disk in pixels (spec §1.3); 0 returns a copy of the mask.

    Returns
    -------
    ndarray of bool, shape (height, width)
        The dilated mask (the ROI the patches are taken from).

    Raises
    ------
    ValueError
        If `mask` is not 2-D or `radius` is negative.

    Examples
    --------
    >>> import numpy as np
    >>> mask = np.zeros((5, 5), dtype=bool)
    >>> mask[2, 2] = True
    >>> dilate_mask(mask, radius=1).astype(int)
    array([[0, 0, 0, 0, 0],
           [0, 0, 1, 0, 0],
           [0, 1, 1, 1, 0],
           [0, 0, 1, 0, 0],
           [0, 0, 0, 0, 0]])
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0 or not mask.any():
        return mask.copy()
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, mask.shape[0])
    c0, c1 = max(cols[0] - radius, 0), min(cols[-1] + radius + 1, mask.shape[1])
    distance = ndimage.distance_transform_edt(~mask[r0:r1, c0:c1])
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = distance <= radius
    return out


def hazen_quantiles(values: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """MATLAB's default `quantile`: sorted x₍ᵢ₎ sits at (i − 0.5)/m, linear in between, clamped.

    Parameters
    ----------
    values : array_like
        The sample (flattened; at least one value).
    probabilities : array_like of float
        Probabilities in [0, 1] to evaluate the quantile function at.

    Returns
    -------
    ndarray of float64, shape like `probabilities`
        The quantiles.

    Raises
    ------
    ValueError
        If `values` is empty.

    Examples
    --------
    >>> hazen_quantiles([1, 2, 3, 4], [0.0, 0.5, 1.0])
    array([1. , 2.5, 4. ])
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("quantiles of an empty set")
    return np.quantile(values, probabilities, method="hazen")


def intensity_regions(values: np.ndarray, n_regions: int = 8) -> np.ndarray:
    """Intensity-order subregion (0-based, 0..n_regions−1) of each ROI value (spec §2.1).

    Cut points are the j/R Hazen quantiles; a value equal to a cut point goes to the *higher*
    region (MATLAB's loop overwrites earlier regions), so ties can leave regions empty.

    Parameters
    ----------
    values : array_like
        Intensities of the ROI pixels (flattened).
    n_regions : int, default=8
        Number of subregions R (at least 1).

    Returns
    -------
    ndarray of int64, shape (n_values,)
        The subregion of each value.

    Raises
    ------
    ValueError
        If `n_regions` is below 1.

    Examples
    --------
    >>> import numpy as np
    >>> intensity_regions(np.arange(8), n_regions=4)
    array([0, 0, 1, 1, 2, 2, 3, 3])
    """
    if n_regions < 1:
        raise ValueError(f"n_regions must be >= 1, got {n_regions}")
    values = np.asarray(values).ravel()
    if n_regions == 1 or values.size == 0:
        return np.zeros(values.size, dtype=np.int64)
    cuts = hazen_quantiles(values, np.linspace(0.0, 1.0, n_regions + 1))
    return np.searchsorted(cuts[1:n_regions], values, side="right").astype(np.int64)
