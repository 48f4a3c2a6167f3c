"""The sealed mode's owner side: a published patch model (PCA + GMM) → Fisher vectors.

In the `sealed` protection mode the cloud never sees a pixel, so the owner computes each
image's Fisher vector itself, on the *plain* image (method spec §0.1 steps 2–5, the same
`encode_images` the cloud runs in the `pe` mode), with the collection's **patch model**: the
patch PCA and the GMM, fitted by the owner on its own plain templates (or a public set) and
published to the cloud as an artifact, so that every hospital searching the collection
featurises its queries the same way.  The cloud then learns only the metric (CFML) from the
owner-sent Fisher vectors and the training templates' labels (`CBIRPipeline.from_patch_model`
+ `fit_metric`).

`owner_fisher_vectors` is the one owner-side featurisation: the services' `PatchModelFeaturizer`
(the published artifact, one dictionary size), the experiment runner's `sealed` condition
(`pecore.model_selection.evaluate_fold(..., sealed=True)`, several sizes at once) and the
feature-inversion attacks (`pecore.feature_attacks`) all call it, so what they measure is what
an owner sends.  The artifact is an npz of arrays plus JSON parameters (no pickle), like
`CBIRPipeline.save`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.base import BaseEstimator

from pecore.fisher import FisherVectorEncoder
from pecore.pipeline import (
    CBIRPipeline,
    PatchModel,
    encode_images,
    fit_patch_model,
    patch_model_arrays,
    patch_model_from_arrays,
)

__all__ = ["PATCH_MODEL_FORMAT", "WIRE_DTYPE", "PatchModelFeaturizer", "owner_fisher_vectors"]

PATCH_MODEL_FORMAT = "pecbir-patch-model/v1"

#: What one Fisher vector is on the wire: little-endian float32, the encoder's own precision,
#: so shipping it loses nothing (a float64 copy would double the size and add no information).
WIRE_DTYPE = np.dtype("<f4")


class PatchModelFeaturizer(BaseEstimator):
    """Dilated ROI → intensity-order subregions → patches → PCA → GMM Fisher vectors.

    `CBIRPipeline` without the metric: what an owner fits, publishes and featurises with.

    Parameters
    ----------
    n_components : int, default=64
        GMM size K.
    n_regions : int, default=8
        Intensity-order subregions R.
    patch_size : int, default=9
        Patch side P.
    radius : int, default=24
        Dilation radius of the tumour mask.
    pca_energy : float, default=0.99
        Energy the patch PCA keeps.
    n_train_patches : int, default=300_000
        Size cap of the PCA/GMM training sample.
    random_state : int, default=0
        Seed of the patch sample and the GMM.
    n_jobs : int or None, default=None
        Threads used to encode images (None: up to 2).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 200, (6, 32, 32)).astype(np.uint8)
    >>> masks = np.zeros((6, 32, 32), dtype=bool)
    >>> masks[:, 14:18, 14:18] = True
    >>> model = PatchModelFeaturizer(
    ...     n_components=2, n_regions=2, patch_size=3, radius=2, n_train_patches=200
    ... ).fit(images, masks)
    >>> restored = PatchModelFeaturizer.from_bytes(model.to_bytes())
    >>> a, b = model.fisher_vectors(images, masks), restored.fisher_vectors(images, masks)
    >>> bool(np.array_equal(a, b)), a.shape[0]
    (True, 6)
    """

    def __init__(
        self,
        *,
        n_components: int = 64,
        n_regions: int = 8,
        patch_size: int = 9,
        radius: int = 24,
        pca_energy: float = 0.99,
        n_train_patches: int = 300_000,
        random_state: int = 0,
        n_jobs: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.n_regions = n_regions
        self.patch_size = patch_size
        self.radius = radius
        self.pca_energy = pca_energy
        self.n_train_patches = n_train_patches
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]
    ) -> PatchModelFeaturizer:
        """Fit the patch PCA and the GMM on plain images (no label needed).

        Parameters
        ----------
        images : sequence of array_like of shape (height, width)
            The owner's plain 8-bit images (its templates, or a public set).
        masks : sequence of array_like of shape (height, width)
            Their tumour masks.

        Returns
        -------
        PatchModelFeaturizer
            This estimator, fitted.
        """
        model = fit_patch_model(
            images,
            masks,
            [self.n_components],
            patch_size=self.patch_size,
            radius=self.radius,
            pca_energy=self.pca_energy,
            n_train_patches=self.n_train_patches,
            random_state=self.random_state,
        )
        self.pca_ = model.pca
        self.gmm_ = model.gmms[self.n_components]
        self.encoder_ = FisherVectorEncoder(self.gmm_, n_regions=self.n_regions)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "encoder_"):
            raise RuntimeError("PatchModelFeaturizer is not fitted; call fit() or from_bytes()")

    @property
    def n_features(self) -> int:
        """Length F of a Fisher vector."""
        self._check_fitted()
        return int(self.encoder_.n_features)

    def fisher_vectors(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]
    ) -> np.ndarray:
        """Fisher vectors (float32, (n_images, F)); deterministic for given inputs.

        Parameters
        ----------
        images : sequence of array_like of shape (height, width)
            Plain images.
        masks : sequence of array_like of shape (height, width)
            Their tumour masks.

        Returns
        -------
        ndarray of float32, shape (n_images, F)
            The same vectors `CBIRPipeline.fisher_vectors` gives with this PCA and GMM.
        """
        self._check_fitted()
        model = PatchModel(pca=self.pca_, gmms={self.n_components: self.gmm_}, n_training_patches=0)
        (fv,) = owner_fisher_vectors(
            images,
            masks,
            model,
            n_regions=self.n_regions,
            patch_size=self.patch_size,
            radius=self.radius,
            n_jobs=self.n_jobs,
        )
        return fv

    def pipeline(self, *, metric_lambda: float = 1.5e-4, dim: int = 10) -> CBIRPipeline:
        """A `CBIRPipeline` with this PCA and GMM whose metric is still to fit (`fit_metric`)."""
        self._check_fitted()
        params = self.get_params()
        params.pop("n_jobs")
        return CBIRPipeline.from_patch_model(
            self.pca_, self.gmm_, **params, metric_lambda=metric_lambda, dim=dim
        )

    # -- the published artifact ---------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The artifact: npz of the arrays plus JSON parameters (no pickle)."""
        self._check_fitted()
        params = self.get_params()
        params.pop("n_jobs")
        meta = {"format": PATCH_MODEL_FORMAT, "params": params}
        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta_json=np.array(json.dumps(meta, sort_keys=True)),
            **patch_model_arrays(self.pca_, self.gmm_),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PatchModelFeaturizer:
        """Read an artifact written by `to_bytes` (ValueError if it is not one)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                loaded = dict(arrays)
            meta = json.loads(str(loaded["meta_json"]))
        except Exception as exc:  # zipfile, numpy and json raise many types
            raise ValueError(f"not a patch model artifact ({exc})") from None
        if meta.get("format") != PATCH_MODEL_FORMAT:
            raise ValueError(f"unsupported patch model format {meta.get('format')!r}")
        model = cls(**meta["params"])
        try:
            model.pca_, model.gmm_ = patch_model_from_arrays(loaded, energy=model.pca_energy)
        except KeyError as exc:
            raise ValueError(f"patch model artifact without {exc}") from None
        model.encoder_ = FisherVectorEncoder(model.gmm_, n_regions=model.n_regions)
        return model

    @staticmethod
    def digest(data: bytes) -> str:
        """SHA-256 (hex) of an artifact's bytes: the name sealed records cite it by."""
        return hashlib.sha256(data).hexdigest()


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
