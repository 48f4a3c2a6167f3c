"""The owner side of a `sealed` collection: Fisher vectors computed at the hospital (issue 12).

In the sealed protection mode no pixel reaches the cloud.  The owner seals each image (and its
mask) under a standard cipher and computes the image's Fisher vectors itself, on the *plain*
image, with the collection's published patch model (PCA + GMM, `pecore.pipeline.PatchModel`,
fitted by an owner on its own plain images or on a public set).  The cloud receives one vector
per image as little-endian float32 (`fisher_vector_bytes`), learns CFML from the templates'
vectors and labels, and ranks projected vectors exactly as in the one-stage path.

`owner_fisher_vectors` is the one owner-side featurisation: the experiment runner's `sealed`
condition (`pecore.model_selection.evaluate_fold(..., sealed=True)`) and the feature-inversion
attacks (`pecore.feature_attacks`) call it, so what they measure is what an owner sends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pecore.fisher import FisherVectorEncoder
from pecore.pipeline import PatchModel, encode_images

__all__ = [
    "WIRE_DTYPE",
    "fisher_vector_bytes",
    "fisher_vector_from_bytes",
    "owner_fisher_vectors",
]

#: What one Fisher vector is on the wire: little-endian float32, the encoder's own precision,
#: so shipping it loses nothing (a float64 copy would double the size and add no information).
WIRE_DTYPE = np.dtype("<f4")


def owner_fisher_vectors(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    model: PatchModel,
    *,
    dictionary_sizes: Sequence[int] | None = None,
    n_regions: int = 8,
    patch_size: int = 9,
    radius: int = 24,
    rois: Sequence[np.ndarray] | None = None,
    n_jobs: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[np.ndarray]:
    """The Fisher vectors an owner sends for its plain images, one matrix per dictionary size.

    Parameters
    ----------
    images : sequence of array_like of shape (height, width), uint8
        Plain images (the owner never featurises a cipher image in sealed mode).
    masks : sequence of array_like of shape (height, width)
        Their tumour masks.
    model : PatchModel
        The collection's published patch model.
    dictionary_sizes : sequence of int, optional
        GMM sizes to encode with (default: every size of `model`, ascending).
    n_regions : int, default=8
        Intensity-order subregions.
    patch_size : int, default=9
        Patch side.
    radius : int, default=24
        ROI dilation radius (ignored where `rois` is given).
    rois : sequence of ndarray of bool, optional
        The masks already dilated by `radius`.
    n_jobs : int, optional
        Encoding threads (None: up to 2).
    progress : callable, optional
        Called with 1 after each image.

    Returns
    -------
    list of ndarray of WIRE_DTYPE, shape (n_images, F_D)
        The vectors of each size, in `dictionary_sizes` order, C-contiguous.

    Raises
    ------
    ValueError
        If the model has no GMM of a requested size, an image is not 2-D uint8, or images
        and masks differ in number.

    Examples
    --------
    >>> import numpy as np
    >>> from pecore.datasets import make_synthetic
    >>> from pecore.pipeline import fit_patch_model
    >>> data = make_synthetic(n_images=6, size=32, seed=1)
    >>> model = fit_patch_model(
    ...     data.images, data.masks, [2], patch_size=3, radius=2, n_train_patches=500
    ... )
    >>> (fv,) = owner_fisher_vectors(data.images, data.masks, model, patch_size=3, radius=2)
    >>> fv.shape[0], fv.dtype.str
    (6, '<f4')
    """
    sizes = sorted(model.gmms) if dictionary_sizes is None else [int(s) for s in dictionary_sizes]
    missing = [s for s in sizes if s not in model.gmms]
    if missing:
        raise ValueError(
            f"the patch model has no GMM of size {missing} (it has {sorted(model.gmms)})"
        )
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 2 or image.dtype != np.uint8:
            raise ValueError(
                f"image {i} is {image.dtype} of shape {image.shape}; the owner featurises plain "
                "2-D uint8 images"
            )
    encoders = [FisherVectorEncoder(model.gmms[s], n_regions=n_regions) for s in sizes]
    vectors = encode_images(
        images,
        masks,
        model.pca,
        encoders,
        patch_size=patch_size,
        radius=radius,
        rois=rois,
        n_jobs=n_jobs,
        progress=progress,
    )
    return [np.ascontiguousarray(v, dtype=WIRE_DTYPE) for v in vectors]


def fisher_vector_bytes(vector: np.ndarray) -> bytes:
    """One Fisher vector as the owner sends it: little-endian float32 bytes.

    Parameters
    ----------
    vector : array_like of shape (F,)
        A row of `owner_fisher_vectors`.

    Returns
    -------
    bytes
        4·F bytes.

    Raises
    ------
    ValueError
        If the vector is not 1-D, empty, or holds a non-finite value.

    Examples
    --------
    >>> import numpy as np
    >>> data = fisher_vector_bytes(np.array([0.5, -1.0], dtype=np.float32))
    >>> len(data), fisher_vector_from_bytes(data, n_features=2).tolist()
    (8, [0.5, -1.0])
    """
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"a Fisher vector is one non-empty row, got shape {vector.shape}")
    wire = np.ascontiguousarray(vector, dtype=WIRE_DTYPE)
    if not np.all(np.isfinite(wire)):
        raise ValueError("the Fisher vector holds NaN or infinite values")
    return wire.tobytes()


def fisher_vector_from_bytes(data: bytes, *, n_features: int) -> np.ndarray:
    """The Fisher vector in `data` (as `fisher_vector_bytes` wrote it), checked before use.

    Parameters
    ----------
    data : bytes
        4·`n_features` bytes of little-endian float32.
    n_features : int
        The collection's Fisher-vector length (2·D·Dp·R of its patch model).

    Returns
    -------
    ndarray of float32, shape (n_features,)
        A fresh, writable array in native byte order.

    Raises
    ------
    ValueError
        If the length is not 4·`n_features` bytes or a value is not finite.
    """
    expected = WIRE_DTYPE.itemsize * int(n_features)
    if len(data) != expected:
        raise ValueError(
            f"a Fisher vector of {n_features} features is {expected} bytes, got {len(data)}"
        )
    vector = np.frombuffer(data, dtype=WIRE_DTYPE).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise ValueError("the Fisher vector holds NaN or infinite values")
    return vector
