"""Local features: dense raw P×P patches of min–max normalised intensities in the ROI, the
training-patch sample, and PCA at a fixed energy (method spec §1.2, §1.4, §3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator

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
    """Per-image min–max normalisation to [0, 1] in float32 over the whole image (§1.2).

    Parameters
    ----------
    image : array_like of shape (height, width)
        A plain or cipher image, any numeric dtype.

    Returns
    -------
    ndarray of float32, shape (height, width)
        (image − min) / (max − min); all zeros for a constant image.

    Raises
    ------
    ValueError
        If `image` is not 2-D.

    Examples
    --------
    >>> import numpy as np
    >>> minmax_normalise(np.array([[10, 20], [30, 50]], dtype=np.uint8))
    array([[0.  , 0.25],
           [0.5 , 1.  ]], dtype=float32)
    """
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


def extract_patches(
    image: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    size: int,
    *,
    tile: int | None = None,
) -> np.ndarray:
    """The size×size blocks centred on (rows, cols), flattened row-major: (T, size²).

    Patches that would leave the image use reflect padding (never the case for the figshare data
    with radius 24 and P = 9, where Cheng's code does no bounds check; spec §1.4).

    With `tile` ("tile-reflected patches", pe-roi's "-rf" spelling, `pecore.cipher_roi`), the
    image is a grid of tile×tile tiles and every patch is cut from its centre's own tile,
    padded by reflection of that tile's pixels (``np.pad(tile, size // 2, mode="reflect")``),
    so that no patch reads a pixel of another tile.  A patch that lies inside its tile is the
    plain one.

    Parameters
    ----------
    image : ndarray of shape (height, width)
        The (normalised) image to cut from.
    rows, cols : ndarray of int, shape (n_patches,)
        Patch centres.
    size : int
        Patch side P (odd, positive).
    tile : int, optional
        Side of the tiles every patch is confined to (must divide the image's sides and
        exceed ⌊P/2⌋); None cuts the patches from the whole image.

    Returns
    -------
    ndarray of shape (n_patches, size * size), dtype of `image`
        One flattened patch per row (a view into `image` where no padding was needed).

    Raises
    ------
    ValueError
        If `size` is even or not positive, or `tile` does not divide the image or is not
        larger than ⌊P/2⌋.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(25).reshape(5, 5)
    >>> extract_patches(image, np.array([2]), np.array([2]), 3)
    array([[ 6,  7,  8, 11, 12, 13, 16, 17, 18]])

    Confined to 4×4 tiles, a patch inside its tile is the plain one; one on the tile's right
    border reflects its own tile's column instead of reading the next tile:

    >>> image = np.arange(64).reshape(8, 8)
    >>> extract_patches(image, np.array([1, 1]), np.array([1, 3]), 3, tile=4)
    array([[ 0,  1,  2,  8,  9, 10, 16, 17, 18],
           [ 2,  3,  2, 10, 11, 10, 18, 19, 18]])
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"patch size must be odd and positive, got {size}")
    half = size // 2
    if tile is not None:
        return _tile_reflected_patches(image, rows, cols, size, tile)
    h, w = image.shape
    if rows.size and (
        rows.min() < half or cols.min() < half or rows.max() >= h - half or cols.max() >= w - half
    ):
        image = np.pad(image, half, mode="reflect")
        rows, cols = rows + half, cols + half
    windows = np.lib.stride_tricks.sliding_window_view(image, (size, size))
    return windows[rows - half, cols - half].reshape(rows.size, size * size)


def _tile_reflected_patches(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int, tile: int
) -> np.ndarray:
    """`extract_patches` with `tile`: tile view → each used tile padded by reflection → windows."""
    half = size // 2
    h, w = image.shape
    if tile < 1 or h % tile or w % tile:
        raise ValueError(f"tile {tile} does not divide the image of shape {image.shape}")
    if half >= tile:
        raise ValueError(f"patches of side {size} cannot be reflected inside {tile}-pixel tiles")
    rows, cols = np.asarray(rows), np.asarray(cols)
    grid = image.reshape(h // tile, tile, w // tile, tile).swapaxes(1, 2)  # view (R, C, b, b)
    which = (rows // tile) * (w // tile) + cols // tile
    used, owner = np.unique(which, return_inverse=True)  # pad only the tiles holding a centre
    tiles = grid[used // (w // tile), used % (w // tile)]
    padded = np.pad(tiles, ((0, 0), (half, half), (half, half)), mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
    return windows[owner.ravel(), rows % tile, cols % tile].reshape(rows.size, size * size)


@dataclass(frozen=True)
class ImagePatches:
    """The ROI patches of one image, **sorted by subregion** (stable, so raster order within).

    `patches[bounds[r]:bounds[r + 1]]` are the patches of subregion r (0-based).

    Attributes
    ----------
    patches : ndarray of float32, shape (n_patches, patch_size ** 2)
        Normalised intensities, one flattened patch per ROI pixel.
    bounds : ndarray of int64, shape (n_regions + 1,)
        Row offsets of the subregions in `patches`.
    """

    patches: np.ndarray  # float32 (T, P²), normalised intensities
    bounds: np.ndarray  # int64 (R + 1,)

    @property
    def n_regions(self) -> int:
        """Number of subregions R."""
        return self.bounds.size - 1


def roi_patches(
    image: np.ndarray,
    mask: np.ndarray,
    patch_size: int = 9,
    radius: int = 24,
    n_regions: int = 8,
    roi: np.ndarray | None = None,
    patch_tile: int | None = None,
) -> ImagePatches:
    """All ROI patches of one (plain or cipher) image with their intensity-order subregions.

    `mask` is the plain tumour mask; it is dilated by `radius` unless the dilated ROI is passed
    as `roi` (to reuse it across conditions). Region cut points come from the normalised
    intensities of this image at the ROI pixels, so a cipher image gets its own regions.

    Parameters
    ----------
    image : array_like of shape (height, width)
        The plain or cipher image.
    mask : array_like of shape (height, width)
        The plain tumour mask (ignored when `roi` is given).
    patch_size : int, default=9
        Patch side P (odd).
    radius : int, default=24
        Dilation radius of the mask (spec §1.3).
    n_regions : int, default=8
        Number of intensity-order subregions R.
    roi : ndarray of bool, shape (height, width), optional
        The already dilated mask, to skip the dilation.
    patch_tile : int, optional
        Cut every patch from its centre's own `patch_tile`-sided tile, reflected at the tile's
        border (`extract_patches`' `tile`; pe-roi's "-rf" spelling); None: from the image.

    Returns
    -------
    ImagePatches
        The patches sorted by subregion, with the subregion bounds.

    Raises
    ------
    ValueError
        If the ROI and the image differ in shape.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    >>> mask = np.zeros((16, 16), dtype=bool)
    >>> mask[6:10, 6:10] = True
    >>> result = roi_patches(image, mask, patch_size=3, radius=1, n_regions=2)
    >>> result.patches.shape, result.patches.dtype
    ((32, 9), dtype('float32'))
    >>> result.bounds.tolist()
    [0, 16, 32]
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
    patches = extract_patches(normalised, rows[order], cols[order], patch_size, tile=patch_tile)
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
    smaller). Only indices are drawn, so the pool is never materialised.

    Parameters
    ----------
    counts : sequence of int
        Number of ROI patches m_i of each training image.
    n_samples : int
        Size cap of the pooled sample (300 000 in the spec).
    rng : numpy.random.Generator
        Source of the draws (the only randomness).
    per_image_fraction : float, default=0.2
        Fraction of each image's patches entering the pool (rounded half up, as MATLAB).

    Returns
    -------
    list of ndarray of int64
        For each image, the sorted positions (into that image's patch array) that were
        selected.

    Examples
    --------
    >>> import numpy as np
    >>> picked = training_sample([10, 20], n_samples=100, rng=np.random.default_rng(0))
    >>> [positions.size for positions in picked]
    [2, 4]
    >>> capped = training_sample([10, 20], n_samples=4, rng=np.random.default_rng(0))
    >>> sum(positions.size for positions in capped)
    4
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


class PatchPCA(BaseEstimator):
    """PCA keeping the fewest leading components whose cumulative energy is ≥ `energy` (§3.3).

    The covariance is the unbiased sample covariance (MATLAB `pca`); each axis has its sign
    fixed so that its largest-magnitude loading is positive, so fits are reproducible.

    Parameters
    ----------
    energy : float, default=0.99
        Fraction of the total variance the kept components must reach, in (0, 1].

    Attributes
    ----------
    mean_ : ndarray of float64, shape (n_features,)
        Per-feature mean of the training sample.
    components_ : ndarray of float64, shape (n_components_, n_features)
        Principal axes, in order of decreasing variance.
    explained_variance_ : ndarray of float64, shape (n_components_,)
        Variance along each kept axis.
    explained_variance_ratio_ : ndarray of float64, shape (n_components_,)
        That variance as a fraction of the total.
    n_components_ : int
        Number of kept components Dp.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((500, 4)) * [10.0, 5.0, 0.1, 0.1]
    >>> pca = PatchPCA(energy=0.9).fit(X)
    >>> pca
    PatchPCA(energy=0.9)
    >>> pca.n_components_
    2
    >>> y = pca.transform(X)
    >>> y.shape, y.dtype
    ((500, 2), dtype('float32'))
    """

    def __init__(self, *, energy: float = 0.99) -> None:
        self.energy = energy

    def fit(self, X: np.ndarray) -> PatchPCA:
        """Learn the mean and the kept principal axes.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Training patches (at least 2 rows); computed in float64.

        Returns
        -------
        PatchPCA
            This estimator, fitted.

        Raises
        ------
        ValueError
            If `energy` is outside (0, 1] or `X` is not a 2-D sample of at least 2 rows.
        """
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
        """Project patches: y = Wᵀ(x − m), computed in float32.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Patches to project.

        Returns
        -------
        ndarray of float32, shape (n_samples, n_components_)
            The projected patches.
        """
        out = np.asarray(X, dtype=np.float32) @ self._projection
        out -= self._offset
        return out

    def get_state(self) -> dict[str, np.ndarray]:
        """The fitted arrays by name (for saving without pickle; see `from_state`).

        Returns
        -------
        dict of str to ndarray
            "mean", "components", "variance" and "ratio".
        """
        return {
            "mean": self.mean_,
            "components": self.components_,
            "variance": self.explained_variance_,
            "ratio": self.explained_variance_ratio_,
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], *, energy: float) -> PatchPCA:
        """A fitted PatchPCA from `get_state()`'s arrays and the `energy` it was fitted with.

        Parameters
        ----------
        state : dict of str to ndarray
            The arrays "mean", "components", "variance" and "ratio".
        energy : float
            The constructor parameter the state was fitted with.

        Returns
        -------
        PatchPCA
            A fitted estimator equal to the one that was saved.
        """
        pca = cls(energy=energy)
        pca.mean_ = np.asarray(state["mean"], dtype=np.float64)
        pca.components_ = np.asarray(state["components"], dtype=np.float64)
        pca.explained_variance_ = np.asarray(state["variance"], dtype=np.float64)
        pca.explained_variance_ratio_ = np.asarray(state["ratio"], dtype=np.float64)
        pca.n_components_ = pca.components_.shape[0]
        pca._projection = pca.components_.T.astype(np.float32)
        pca._offset = (pca.mean_ @ pca.components_.T).astype(np.float32)
        return pca
