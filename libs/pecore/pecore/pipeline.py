"""The Cheng et al. 2016 retrieval pipeline as one estimator (method spec §0.1 steps 2–6).

`CBIRPipeline.fit(images, masks, labels)` learns PCA, GMM and CFML from database images;
`transform(images, masks)` maps images to `dim`-dimensional vectors whose squared Euclidean
distances rank the database. It never needs a key: it works the same on plain and cipher images
(the plain tumour masks travel unencrypted next to cipher images, spec §1.3).

`fit_patch_model` and `encode_images` are the building blocks, exposed so that the experiment
runner can share patch extraction and PCA across several dictionary sizes.
"""

from __future__ import annotations

import inspect
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

import numpy as np
from sklearn.base import BaseEstimator

from pecore.features import (
    PatchPCA,
    extract_patches,
    minmax_normalise,
    roi_patches,
    training_sample,
)
from pecore.fisher import DiagonalGMM, FisherVectorEncoder, moments
from pecore.metric import CFML
from pecore.roi import dilate_mask

__all__ = [
    "CBIRPipeline",
    "PatchModel",
    "dilated_rois",
    "encode_images",
    "fit_patch_model",
    "patch_model_arrays",
    "patch_model_from_arrays",
]

_FORMAT_VERSION = 1  # of the saved npz; `load` refuses any other
# Where the features are computed, not what they are: never saved with a model, so a model file
# does not depend on the machine that wrote it (and files stay byte-identical to older ones).
_EXECUTION_PARAMS = ("backend", "device")


@dataclass
class PatchModel:
    """PCA of the local patches plus one GMM per dictionary size, learned on one training set.

    Attributes
    ----------
    pca : PatchPCA
        The fitted patch PCA.
    gmms : dict of int to DiagonalGMM
        The fitted mixture of each dictionary size.
    n_training_patches : int
        Size of the patch sample both were fitted on.
    """

    pca: PatchPCA
    gmms: dict[int, DiagonalGMM]
    n_training_patches: int


def _default_jobs(n_jobs: int | None) -> int:
    return max(1, n_jobs if n_jobs is not None else min(2, os.cpu_count() or 1))


def dilated_rois(masks: Sequence[np.ndarray], radius: int) -> list[np.ndarray]:
    """Each tumour mask dilated by a disk of `radius` (the ROIs patches are taken from).

    Parameters
    ----------
    masks : sequence of array_like of shape (height, width)
        Tumour masks.
    radius : int
        Dilation radius in pixels.

    Returns
    -------
    list of ndarray of bool
        The ROI of each mask (see `pecore.roi.dilate_mask`).

    Examples
    --------
    >>> import numpy as np
    >>> mask = np.zeros((5, 5), dtype=bool)
    >>> mask[2, 2] = True
    >>> [int(roi.sum()) for roi in dilated_rois([mask, mask], radius=1)]
    [5, 5]
    """
    return [dilate_mask(np.asarray(m, dtype=bool), radius) for m in masks]


def fit_patch_model(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    dictionary_sizes: Sequence[int],
    *,
    patch_size: int = 9,
    radius: int = 24,
    pca_energy: float = 0.99,
    n_train_patches: int = 300_000,
    random_state: int = 0,
    rois: Sequence[np.ndarray] | None = None,
    patch_tile: int | None = None,
) -> PatchModel:
    """Sample training patches (1/5 per image, then `n_train_patches`), fit PCA and the GMMs.

    Each dictionary size gets its own GMM seed, derived from `random_state` and the size, so
    a size's model does not depend on which other sizes are fitted alongside.

    `images` and `masks` may be lazy sequences (each item read on indexing, e.g. from a
    store): without `rois`, one image is held at a time, masks are read twice and images
    once, so memory does not grow with the number of images (issue 17).

    Parameters
    ----------
    images : sequence of array_like of shape (height, width)
        Training images (plain or cipher).
    masks : sequence of array_like of shape (height, width)
        Their plain tumour masks.
    dictionary_sizes : sequence of int
        The GMM sizes K to fit.
    patch_size : int, default=9
        Patch side P.
    radius : int, default=24
        Dilation radius of the masks.
    pca_energy : float, default=0.99
        Energy the PCA keeps.
    n_train_patches : int, default=300_000
        Size cap of the pooled training sample.
    random_state : int, default=0
        Seed of the patch sample and of the GMMs.
    rois : sequence of ndarray of bool, optional
        The masks already dilated by `radius`.
    patch_tile : int, optional
        Tile-reflected patches (`pecore.features.extract_patches`' `tile`); None: plain ones.

    Returns
    -------
    PatchModel
        The fitted PCA and GMMs.

    Raises
    ------
    ValueError
        If there are no images or images and masks differ in number.
    """
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    if len(images) == 0:
        raise ValueError("no training images")
    rng = np.random.default_rng(random_state)

    def roi_of(i: int) -> np.ndarray:
        if rois is not None:
            return rois[i]
        return dilate_mask(np.asarray(masks[i], dtype=bool), radius)

    counts = np.array([int(np.count_nonzero(roi_of(i))) for i in range(len(masks))])
    chosen = training_sample(counts, n_train_patches, rng)
    parts = []
    for i, positions in enumerate(chosen):
        if positions.size:
            # positions index the ROI pixels in raster order; only the chosen patches are cut
            rows, cols = np.nonzero(roi_of(i))
            normalised = minmax_normalise(images[i])
            parts.append(
                extract_patches(
                    normalised, rows[positions], cols[positions], patch_size, tile=patch_tile
                )
            )
    sample = np.concatenate(parts)
    pca = PatchPCA(energy=pca_energy).fit(sample)
    projected = pca.transform(sample)
    gmms = {}
    for size in dictionary_sizes:
        # a seed per size, independent of which other sizes are fitted alongside
        seed = int(np.random.SeedSequence([random_state, int(size)]).generate_state(1)[0])
        gmms[int(size)] = DiagonalGMM(n_components=int(size), random_state=seed).fit(projected)
    return PatchModel(pca=pca, gmms=gmms, n_training_patches=int(sample.shape[0]))


def encode_images(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    pca: PatchPCA,
    encoders: Sequence[FisherVectorEncoder],
    *,
    patch_size: int = 9,
    radius: int = 24,
    rois: Sequence[np.ndarray] | None = None,
    n_jobs: int | None = None,
    progress: Callable[[int], object] | None = None,
    patch_tile: int | None = None,
) -> list[np.ndarray]:
    """Fisher vectors of every image for each encoder: a list of float32 (n, F_k) matrices.

    Patches and their PCA projection are computed once per image and shared by all encoders.
    Images are processed by `n_jobs` threads (numpy releases the GIL; BLAS is held to one
    thread per worker meanwhile).

    Parameters
    ----------
    images : sequence of array_like of shape (height, width)
        Images to encode (plain or cipher).
    masks : sequence of array_like of shape (height, width)
        Their plain tumour masks.
    pca : PatchPCA
        The fitted patch PCA.
    encoders : sequence of FisherVectorEncoder
        One encoder per dictionary size; all with the same `n_regions`.
    patch_size : int, default=9
        Patch side P.
    radius : int, default=24
        Dilation radius of the masks.
    rois : sequence of ndarray of bool, optional
        The masks already dilated by `radius`.
    n_jobs : int, optional
        Worker threads; None uses up to 2.
    progress : callable, optional
        Called with 1 after each image (e.g. ``tqdm.update``).
    patch_tile : int, optional
        Tile-reflected patches (`pecore.features.extract_patches`' `tile`); None: plain ones.

    Returns
    -------
    list of ndarray of float32, shape (n_images, encoder.n_features)
        The Fisher vectors of each encoder, in `encoders` order.

    Raises
    ------
    ValueError
        If images and masks differ in number or there are no encoders.
    """
    from threadpoolctl import threadpool_limits

    n = len(images)
    if len(masks) != n:
        raise ValueError(f"{n} images but {len(masks)} masks")
    if not encoders:
        raise ValueError("no encoders")
    n_regions = encoders[0].n_regions
    outputs = [np.zeros((n, enc.n_features), dtype=np.float32) for enc in encoders]

    def work(i: int) -> int:
        roi = rois[i] if rois is not None else dilate_mask(np.asarray(masks[i], dtype=bool), radius)
        patches = roi_patches(
            images[i], roi, patch_size, radius, n_regions, roi=roi, patch_tile=patch_tile
        )
        y = pca.transform(patches.patches)
        y_moments = moments(y)
        for enc, out in zip(encoders, outputs, strict=True):
            out[i] = enc.encode(y, patches.bounds, y_moments)
        return i

    jobs = _default_jobs(n_jobs)
    if jobs == 1:
        for i in range(n):
            work(i)
            if progress is not None:
                progress(1)
    else:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(jobs) as pool:
            for _ in pool.map(work, range(n)):
                if progress is not None:
                    progress(1)
    return outputs


class CBIRPipeline(BaseEstimator):
    """Dilated ROI → intensity-order subregions → raw patches → PCA → GMM Fisher vectors → CFML.

    Parameters follow the method spec defaults.

    Parameters
    ----------
    n_components : int, default=64
        GMM size K (the dictionary size D of the paper).
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
    metric_lambda : float, default=1.5e-4
        CFML's ridge λ.
    dim : int, default=10
        Output dimension of the learned metric.
    random_state : int, default=0
        Seed of the patch sample and the GMM.
    n_jobs : int or None, default=None
        Threads used to encode images (None: up to 2).
    backend : {"numpy", "torch"}, default="numpy"
        Where Fisher vectors and projections are computed: the numpy/numba reference, or
        `pecore.torch_features.TorchFeatures` (batched, on CUDA when present; the `[gpu]`
        extra). PCA, GMM and CFML are fitted by the reference code either way.
    device : str or None, default=None
        The torch device of the "torch" back end (None: CUDA when present, else the CPU).
    patch_tile : int or None, default=None
        Cut every patch from its centre's own `patch_tile`-sided tile, reflected at the tile
        border (`pecore.features.extract_patches`' `tile`; pe-roi's "-rf" spellings).  The
        numpy back end only: the "torch" back end refuses it.  Saved only when set, so the
        files of models without it are unchanged.

    Attributes
    ----------
    pca_ : PatchPCA
        The fitted patch PCA.
    gmm_ : DiagonalGMM
        The fitted visual dictionary.
    encoder_ : FisherVectorEncoder
        The Fisher-vector encoder over `gmm_`.
    metric_ : CFML
        The learned metric.

    Examples
    --------
    >>> import io
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.repeat([1, 2, 3], 4)
    >>> images = rng.integers(0, 200, (12, 32, 32)).astype(np.uint8)
    >>> for image, label in zip(images, labels):
    ...     image[12:20, 12:20] += np.uint8(15 * label)  # a class-dependent brighter square
    >>> masks = np.zeros((12, 32, 32), dtype=bool)
    >>> masks[:, 14:18, 14:18] = True
    >>> pipe = CBIRPipeline(
    ...     n_components=2, n_regions=2, patch_size=3, radius=2, n_train_patches=200, dim=2
    ... ).fit(images, masks, labels)
    >>> pipe
    CBIRPipeline(dim=2, n_components=2, n_regions=2, n_train_patches=200,
                 patch_size=3, radius=2)
    >>> pipe.transform(images, masks).shape
    (12, 2)
    >>> saved = io.BytesIO()
    >>> pipe.save(saved)
    >>> _ = saved.seek(0)
    >>> restored = CBIRPipeline.load(saved)
    >>> bool(np.array_equal(restored.transform(images, masks), pipe.transform(images, masks)))
    True
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
        metric_lambda: float = 1.5e-4,
        dim: int = 10,
        random_state: int = 0,
        n_jobs: int | None = None,
        backend: str = "numpy",
        device: str | None = None,
        patch_tile: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.n_regions = n_regions
        self.patch_size = patch_size
        self.radius = radius
        self.pca_energy = pca_energy
        self.n_train_patches = n_train_patches
        self.metric_lambda = metric_lambda
        self.dim = dim
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.backend = backend
        self.device = device
        self.patch_tile = patch_tile

    # -- learning ----------------------------------------------------------------------------
    def fit(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], labels: np.ndarray
    ) -> CBIRPipeline:
        """Learn PCA, GMM and CFML from database images.

        Parameters
        ----------
        images : sequence of array_like of shape (height, width)
            Training images (plain or cipher).
        masks : sequence of array_like of shape (height, width)
            Their plain tumour masks.
        labels : array_like of shape (n_images,)
            Their classes.

        Returns
        -------
        CBIRPipeline
            This estimator, fitted.

        Raises
        ------
        ValueError
            If images, masks and labels differ in number.
        """
        labels = _checked_labels(images, masks, labels)
        rois = dilated_rois(masks, self.radius)
        self._fit_dictionary(images, masks, rois)
        train_fv = self._fisher_vectors(images, masks, rois)
        self.metric_ = CFML(reg=self.metric_lambda, n_components=self.dim).fit(train_fv, labels)
        return self

    def fit_streamed(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        labels: np.ndarray,
        *,
        chunk_size: int = 1024,
        spill_dir: str | os.PathLike[str] | None = None,
        metric_solver: str = "dual",
    ) -> CBIRPipeline:
        """`fit` for more templates than fit in memory: nothing grows with n except the n×n Gram
        (or, with ``metric_solver="primal"``, nothing at all).

        Images and masks may be lazy sequences (read on indexing, e.g. from a store). The patch
        model reads one image at a time (`fit_patch_model`); the training Fisher vectors are
        computed `chunk_size` images at a time and spilled to `.npy` files, from which
        `CFML.fit_chunks` assembles the Gram block by block. The result equals `fit` up to
        float32 summation order in the Gram and W.

        Parameters
        ----------
        images : sequence of array_like of shape (height, width)
            Training images (plain or cipher); may be lazy.
        masks : sequence of array_like of shape (height, width)
            Their plain tumour masks; may be lazy.
        labels : array_like of shape (n_images,)
            Their classes.
        chunk_size : int, default=1024
            Images per Fisher-vector chunk (memory: two chunks of F floats each).
        spill_dir : path-like, optional
            Where the chunks are written (a temporary directory, removed after, by default).
        metric_solver : {"dual", "primal"}, default="dual"
            `CFML`'s `solver`. "dual" is exact and the cheaper below F templates (F = 81 920,
            N = 10⁴ on an H100: 75 s, 4.6 GiB); "primal" holds 2·F² floats whatever n is, for
            templates whose n×n Gram does not fit (N = 5·10⁴ on an H100: 113 s, 53 GiB;
            results/gpu/h100-s11/).

        Returns
        -------
        CBIRPipeline
            This estimator, fitted.

        Raises
        ------
        ValueError
            If images, masks and labels differ in number, `chunk_size` is below 1, or
            `metric_solver` or `dim` is not one CFML accepts.
        """
        import tempfile

        labels = _checked_labels(images, masks, labels)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        metric = CFML(reg=self.metric_lambda, n_components=self.dim, solver=metric_solver)
        metric._check_params()  # before the hours of features, not after
        self._fit_dictionary(images, masks, rois=None)
        with tempfile.TemporaryDirectory(dir=spill_dir, prefix="fisher-") as folder:
            paths = []
            for start in range(0, len(images), chunk_size):
                rows = range(start, min(start + chunk_size, len(images)))
                fv = self._fisher_vectors([images[i] for i in rows], [masks[i] for i in rows])
                paths.append(os.path.join(folder, f"{len(paths):06d}.npy"))
                np.save(paths[-1], fv)
                del fv
            chunks = _SpilledChunks(paths)
            device = self._torch_features().device if self.backend == "torch" else None
            self.metric_ = metric.fit_chunks(chunks, labels, device=device)
        return self

    def _fit_dictionary(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        rois: Sequence[np.ndarray] | None,
    ) -> None:
        """PCA and GMM (`fit_patch_model`), and the encoder over them."""
        self._check_backend()
        model = fit_patch_model(
            images,
            masks,
            [self.n_components],
            patch_size=self.patch_size,
            radius=self.radius,
            pca_energy=self.pca_energy,
            n_train_patches=self.n_train_patches,
            random_state=self.random_state,
            rois=rois,
            patch_tile=self.patch_tile,
        )
        self.pca_ = model.pca
        self.gmm_ = model.gmms[self.n_components]
        self.encoder_ = FisherVectorEncoder(self.gmm_, n_regions=self.n_regions)
        self._torch_cache = None  # built over the new PCA and GMM on first use

    def _check_backend(self) -> None:
        """Refuse the torch back end with tile-reflected patches (numpy only), before any work."""
        if self.backend == "torch" and self.patch_tile is not None:
            raise ValueError(
                f"patch_tile={self.patch_tile} (tile-reflected patches) is computed by the "
                "numpy back end only; use backend='numpy'"
            )

    def _check_fitted(self) -> None:
        if not hasattr(self, "metric_"):
            raise RuntimeError("CBIRPipeline is not fitted; call fit() or load() first")

    def _torch_features(self):  # -> pecore.torch_features.TorchFeatures
        """The torch back end over the fitted PCA and GMM (built once per device)."""
        from pecore.torch_features import TorchFeatures

        self._check_backend()

        cached = getattr(self, "_torch_cache", None)
        if cached is None or cached[0] != self.device:
            features = TorchFeatures(
                self.pca_,
                self.gmm_,
                n_regions=self.n_regions,
                patch_size=self.patch_size,
                device=self.device,
            )
            cached = (self.device, features)
            self._torch_cache = cached
        return cached[1]

    def _fisher_vectors(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        rois: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        if self.backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {self.backend!r}")
        if self.backend == "torch":
            _check_pairs(images, masks)
            if rois is None:  # the masks are dilated on the device
                return self._torch_features().fisher_vectors(images, masks, radius=self.radius)
            return self._torch_features().fisher_vectors(images, rois)
        (fv,) = encode_images(
            images,
            masks,
            self.pca_,
            [self.encoder_],
            patch_size=self.patch_size,
            radius=self.radius,
            rois=rois,
            n_jobs=self.n_jobs,
            patch_tile=self.patch_tile,
        )
        return fv

    # -- the sealed mode: patch model from the owner, metric from owner-sent Fisher vectors ---
    @classmethod
    def from_patch_model(cls, pca: PatchPCA, gmm: DiagonalGMM, **params: object) -> CBIRPipeline:
        """A pipeline with a given (published) PCA and GMM; its metric comes from `fit_metric`.

        Parameters
        ----------
        pca : PatchPCA
            The fitted patch PCA.
        gmm : DiagonalGMM
            The fitted visual dictionary (`n_components` is taken from it).
        **params
            The other constructor parameters (`n_regions`, `patch_size`, `radius`, ...).

        Returns
        -------
        CBIRPipeline
            PCA, GMM and encoder set; not fitted until `fit_metric`.
        """
        pipe = cls(**{**params, "n_components": int(gmm.weights_.shape[0])})
        pipe.pca_ = pca
        pipe.gmm_ = gmm
        pipe.encoder_ = FisherVectorEncoder(gmm, n_regions=pipe.n_regions)
        return pipe

    def fit_metric(self, fisher_vectors: np.ndarray, labels: np.ndarray) -> CBIRPipeline:
        """Learn CFML from Fisher vectors computed elsewhere with this pipeline's PCA and GMM.

        Parameters
        ----------
        fisher_vectors : array_like of shape (n_images, F)
            The templates' Fisher vectors.
        labels : array_like of shape (n_images,)
            Their classes.

        Returns
        -------
        CBIRPipeline
            This estimator, fitted.
        """
        if not hasattr(self, "encoder_"):
            raise RuntimeError("fit_metric needs the PCA and GMM (from_patch_model) first")
        fisher_vectors = np.asarray(fisher_vectors)
        if fisher_vectors.ndim != 2 or fisher_vectors.shape[1] != self.encoder_.n_features:
            raise ValueError(
                f"Fisher vectors of shape {fisher_vectors.shape}; expected (n, "
                f"{self.encoder_.n_features})"
            )
        self.metric_ = CFML(reg=self.metric_lambda, n_components=self.dim).fit(
            fisher_vectors, np.asarray(labels)
        )
        return self

    # -- inference ---------------------------------------------------------------------------
    def fisher_vectors(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]
    ) -> np.ndarray:
        """The Fisher vectors of images, before the metric.

        Parameters
        ----------
        images : sequence of array_like of shape (height, width)
            Images (plain or cipher).
        masks : sequence of array_like of shape (height, width)
            Their plain tumour masks.

        Returns
        -------
        ndarray of float32, shape (n_images, F)
            F = n_regions · 2 · n_components · Dp.

        Raises
        ------
        RuntimeError
            If the pipeline is not fitted.
        """
        self._check_fitted()
        return self._fisher_vectors(images, masks)

    def project(self, fisher_vectors: np.ndarray) -> np.ndarray:
        """Map Fisher vectors into the learned metric space.

        Parameters
        ----------
        fisher_vectors : array_like of shape (n_images, F) or (F,)
            Output of `fisher_vectors`.

        Returns
        -------
        ndarray of float32, shape (n_images, dim)
            The retrieval vectors (fewer columns if CFML learned fewer than `dim`).

        Raises
        ------
        RuntimeError
            If the pipeline is not fitted.
        ValueError
            If the vectors do not have F features.
        """
        self._check_fitted()
        fisher_vectors = np.atleast_2d(np.asarray(fisher_vectors))
        expected = self.metric_.components_.shape[0]
        if fisher_vectors.shape[1] != expected:
            raise ValueError(
                f"Fisher vectors have {fisher_vectors.shape[1]} features, expected {expected}"
            )
        if self.backend == "torch":
            vectors = self._torch_features().project(fisher_vectors, self._components())
            return vectors.astype(np.float32)
        return self.metric_.transform(fisher_vectors, self.dim).astype(np.float32)

    def _components(self) -> np.ndarray:
        """The first `dim` columns of W: what `project` multiplies by."""
        return self.metric_.components_[:, : self.dim]

    @property
    def projected_dim(self) -> int:
        """Columns of `project`'s output: `dim`, or fewer where CFML learned fewer.

        Raises
        ------
        RuntimeError
            If the pipeline is not fitted.
        """
        self._check_fitted()
        return min(int(self.dim), int(self.metric_.components_.shape[1]))

    def transform(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        """Retrieval vectors of images: ``project(fisher_vectors(images, masks))``.

        Their squared Euclidean distances rank the database (`pecore.evaluate`).

        Parameters
        ----------
        images : sequence of array_like of shape (height, width)
            Images (plain or cipher).
        masks : sequence of array_like of shape (height, width)
            Their plain tumour masks.

        Returns
        -------
        ndarray of float32, shape (n_images, dim)
            The retrieval vectors.
        """
        if self.backend == "torch":  # the Fisher vectors stay on the device
            self._check_fitted()
            _check_pairs(images, masks)
            vectors = self._torch_features().transform(
                images, masks, self._components(), radius=self.radius
            )
            return vectors.astype(np.float32)
        return self.project(self.fisher_vectors(images, masks))

    # -- persistence (npz arrays + JSON parameters; no pickle) -------------------------------
    def save(self, path_or_file: str | os.PathLike[str] | IO[bytes]) -> None:
        """Write the fitted model as an npz of arrays plus JSON parameters (no pickle).

        Parameters
        ----------
        path_or_file : str, path-like or binary file
            Where to write.

        Raises
        ------
        RuntimeError
            If the pipeline is not fitted.
        """
        self._check_fitted()
        params = self.get_params(deep=False)
        # in __init__ order, as files were written before get_params came from BaseEstimator
        # (which sorts the names): a model saved now is byte-identical to one saved then
        ordered = {
            name: params[name]
            for name in inspect.signature(type(self)).parameters
            if name not in _EXECUTION_PARAMS and not (name == "patch_tile" and params[name] is None)
        }
        meta = {"format_version": _FORMAT_VERSION, "params": ordered}
        arrays = {
            "meta_json": np.array(json.dumps(meta)),
            **patch_model_arrays(self.pca_, self.gmm_),
            "metric_components": self.metric_.components_,
            "metric_eigenvalues": self.metric_.eigenvalues_,
        }
        if isinstance(path_or_file, (str, os.PathLike)):
            with open(path_or_file, "wb") as fh:
                np.savez(fh, **arrays)
        else:
            np.savez(path_or_file, **arrays)

    @classmethod
    def load(cls, path_or_file: str | os.PathLike[str] | IO[bytes]) -> CBIRPipeline:
        """Read a model written by `save`.

        Parameters
        ----------
        path_or_file : str, path-like or binary file
            Where to read from.

        Returns
        -------
        CBIRPipeline
            The fitted pipeline, equal in every array to the saved one.

        Raises
        ------
        ValueError
            If the file is not a CBIRPipeline model of this format version.
        """
        if isinstance(path_or_file, (str, os.PathLike)):
            with open(path_or_file, "rb") as fh:
                data = dict(np.load(io.BytesIO(fh.read()), allow_pickle=False))
        else:
            data = dict(np.load(path_or_file, allow_pickle=False))
        try:
            meta = json.loads(str(data["meta_json"]))
        except KeyError as exc:
            raise ValueError("not a CBIRPipeline file (no meta_json)") from exc
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported CBIRPipeline format {meta.get('format_version')}")
        pipe = cls(**meta["params"])
        pipe.pca_, pipe.gmm_ = patch_model_from_arrays(data, energy=pipe.pca_energy)
        pipe.encoder_ = FisherVectorEncoder(pipe.gmm_, n_regions=pipe.n_regions)
        metric = CFML(reg=pipe.metric_lambda, n_components=pipe.dim)
        metric.components_ = np.asarray(data["metric_components"], dtype=np.float64)
        metric.eigenvalues_ = np.asarray(data["metric_eigenvalues"], dtype=np.float64)
        pipe.metric_ = metric
        return pipe


def _checked_labels(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], labels: np.ndarray
) -> np.ndarray:
    labels = np.asarray(labels)
    if not (len(images) == len(masks) == labels.shape[0]):
        raise ValueError(
            f"{len(images)} images, {len(masks)} masks and {labels.shape[0]} labels differ"
        )
    return labels


class _SpilledChunks(Sequence[np.ndarray]):
    """Fisher-vector chunks spilled to `.npy` files, read on each access (not memory-mapped:
    mapped pages of every chunk would count in the address space and RSS)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        return np.load(self.paths[i])


def patch_model_arrays(pca: PatchPCA, gmm: DiagonalGMM) -> dict[str, np.ndarray]:
    """The arrays of a fitted PCA and GMM as saved files hold them (names fixed, in order).

    `CBIRPipeline.save` and the sealed mode's published patch model
    (`pecore.owner_features.PatchModelFeaturizer.to_bytes`) write them; `patch_model_from_arrays`
    reads them back.

    Parameters
    ----------
    pca : PatchPCA
        The fitted patch PCA.
    gmm : DiagonalGMM
        The fitted visual dictionary.

    Returns
    -------
    dict of str to ndarray
        ``pca_*`` and ``gmm_*`` arrays, in the order saved files hold them.
    """
    return {
        "pca_mean": pca.mean_,
        "pca_components": pca.components_,
        "pca_variance": pca.explained_variance_,
        "pca_ratio": pca.explained_variance_ratio_,
        "gmm_weights": gmm.weights_,
        "gmm_means": gmm.means_,
        "gmm_variances": gmm.variances_,
    }


def patch_model_from_arrays(
    arrays: Mapping[str, np.ndarray], *, energy: float
) -> tuple[PatchPCA, DiagonalGMM]:
    """The PCA and GMM whose arrays `patch_model_arrays` wrote.

    Parameters
    ----------
    arrays : mapping of str to ndarray
        The saved arrays (an npz file's contents).
    energy : float
        The PCA's energy parameter.

    Returns
    -------
    tuple of (PatchPCA, DiagonalGMM)
        The restored, fitted estimators.

    Raises
    ------
    KeyError
        If one of the arrays is missing.
    """
    pca = PatchPCA.from_state(
        {
            "mean": arrays["pca_mean"],
            "components": arrays["pca_components"],
            "variance": arrays["pca_variance"],
            "ratio": arrays["pca_ratio"],
        },
        energy=energy,
    )
    gmm = DiagonalGMM.from_state(
        {
            "weights": arrays["gmm_weights"],
            "means": arrays["gmm_means"],
            "variances": arrays["gmm_variances"],
        }
    )
    return pca, gmm


def _check_pairs(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if len(masks) != len(images):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
