"""The Cheng et al. 2016 retrieval pipeline as one estimator (method spec §0.1 steps 2–6).

`CBIRPipeline.fit(images, masks, labels)` learns PCA, GMM and CFML from database images;
`transform(images, masks)` maps images to `dim`-dimensional vectors whose squared Euclidean
distances rank the database. It never needs a key: it works the same on plain and cipher images
(the plain tumour masks travel unencrypted next to cipher images, spec §1.3).

`fit_patch_model` and `encode_images` are the building blocks, exposed so that the experiment
runner can share patch extraction and PCA across several dictionary sizes.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

import numpy as np

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

__all__ = ["CBIRPipeline", "PatchModel", "dilated_rois", "encode_images", "fit_patch_model"]

FORMAT_VERSION = 1


@dataclass
class PatchModel:
    """PCA of the local patches plus one GMM per dictionary size, learned on one training set."""

    pca: PatchPCA
    gmms: dict[int, DiagonalGMM]
    n_training_patches: int


def _default_jobs(n_jobs: int | None) -> int:
    return max(1, n_jobs if n_jobs is not None else min(2, os.cpu_count() or 1))


def dilated_rois(masks: Sequence[np.ndarray], radius: int) -> list[np.ndarray]:
    """Each tumour mask dilated by a disk of `radius` (the ROIs patches are taken from)."""
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
) -> PatchModel:
    """Sample training patches (1/5 per image, then `n_train_patches`), fit PCA and the GMMs."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    if len(images) == 0:
        raise ValueError("no training images")
    rng = np.random.default_rng(random_state)
    if rois is None:
        rois = dilated_rois(masks, radius)
    counts = np.array([int(np.count_nonzero(r)) for r in rois])
    chosen = training_sample(counts, n_train_patches, rng)
    parts = []
    for image, roi, positions in zip(images, rois, chosen, strict=True):
        if positions.size:
            # positions index the ROI pixels in raster order; only the chosen patches are cut
            rows, cols = np.nonzero(roi)
            normalised = minmax_normalise(image)
            parts.append(extract_patches(normalised, rows[positions], cols[positions], patch_size))
    sample = np.concatenate(parts)
    pca = PatchPCA(pca_energy).fit(sample)
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
) -> list[np.ndarray]:
    """Fisher vectors of every image for each encoder: a list of float32 (n, F_k) matrices.

    Patches and their PCA projection are computed once per image and shared by all encoders.
    Images are processed by `n_jobs` threads (numpy releases the GIL; BLAS is held to one
    thread per worker meanwhile). `progress(n_done)` is called after each image.
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
        patches = roi_patches(images[i], roi, patch_size, radius, n_regions, roi=roi)
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


class CBIRPipeline:
    """Dilated ROI → intensity-order subregions → raw patches → PCA → GMM Fisher vectors → CFML.

    Parameters follow the method spec defaults. `n_jobs` (extra, optional) is the number of
    threads used to encode images (default: up to 2).
    """

    def __init__(
        self,
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

    def get_params(self) -> dict[str, object]:
        return {
            "n_components": self.n_components,
            "n_regions": self.n_regions,
            "patch_size": self.patch_size,
            "radius": self.radius,
            "pca_energy": self.pca_energy,
            "n_train_patches": self.n_train_patches,
            "metric_lambda": self.metric_lambda,
            "dim": self.dim,
            "random_state": self.random_state,
            "n_jobs": self.n_jobs,
        }

    # -- learning ----------------------------------------------------------------------------
    def fit(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], labels: np.ndarray
    ) -> CBIRPipeline:
        labels = np.asarray(labels)
        if not (len(images) == len(masks) == labels.shape[0]):
            raise ValueError(
                f"{len(images)} images, {len(masks)} masks and {labels.shape[0]} labels differ"
            )
        rois = dilated_rois(masks, self.radius)
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
        )
        self.pca_ = model.pca
        self.gmm_ = model.gmms[self.n_components]
        self.encoder_ = FisherVectorEncoder(self.gmm_, self.n_regions)
        (train_fv,) = encode_images(
            images,
            masks,
            self.pca_,
            [self.encoder_],
            patch_size=self.patch_size,
            radius=self.radius,
            rois=rois,
            n_jobs=self.n_jobs,
        )
        self.metric_ = CFML(reg=self.metric_lambda, n_components=self.dim).fit(train_fv, labels)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "metric_"):
            raise RuntimeError("CBIRPipeline is not fitted; call fit() or load() first")

    # -- inference ---------------------------------------------------------------------------
    def fisher_vectors(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]
    ) -> np.ndarray:
        """float32 (n, F) Fisher vectors, F = n_regions · 2 · n_components · Dp."""
        self._check_fitted()
        (fv,) = encode_images(
            images,
            masks,
            self.pca_,
            [self.encoder_],
            patch_size=self.patch_size,
            radius=self.radius,
            n_jobs=self.n_jobs,
        )
        return fv

    def project(self, fisher_vectors: np.ndarray) -> np.ndarray:
        """float32 (n, dim) vectors in the learned metric space."""
        self._check_fitted()
        fisher_vectors = np.atleast_2d(np.asarray(fisher_vectors))
        expected = self.metric_.components_.shape[0]
        if fisher_vectors.shape[1] != expected:
            raise ValueError(
                f"Fisher vectors have {fisher_vectors.shape[1]} features, expected {expected}"
            )
        return self.metric_.transform(fisher_vectors, self.dim).astype(np.float32)

    def transform(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        return self.project(self.fisher_vectors(images, masks))

    # -- persistence (npz arrays + JSON parameters; no pickle) -------------------------------
    def save(self, path_or_file: str | os.PathLike[str] | IO[bytes]) -> None:
        self._check_fitted()
        meta = {"format_version": FORMAT_VERSION, "params": self.get_params()}
        arrays = {
            "meta_json": np.array(json.dumps(meta)),
            "pca_mean": self.pca_.mean_,
            "pca_components": self.pca_.components_,
            "pca_variance": self.pca_.explained_variance_,
            "pca_ratio": self.pca_.explained_variance_ratio_,
            "gmm_weights": self.gmm_.weights_,
            "gmm_means": self.gmm_.means_,
            "gmm_variances": self.gmm_.variances_,
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
        if isinstance(path_or_file, (str, os.PathLike)):
            with open(path_or_file, "rb") as fh:
                data = dict(np.load(io.BytesIO(fh.read()), allow_pickle=False))
        else:
            data = dict(np.load(path_or_file, allow_pickle=False))
        try:
            meta = json.loads(str(data["meta_json"]))
        except KeyError as exc:
            raise ValueError("not a CBIRPipeline file (no meta_json)") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported CBIRPipeline format {meta.get('format_version')}")
        pipe = cls(**meta["params"])
        pipe.pca_ = PatchPCA.from_state(
            {
                "mean": data["pca_mean"],
                "components": data["pca_components"],
                "variance": data["pca_variance"],
                "ratio": data["pca_ratio"],
            },
            pipe.pca_energy,
        )
        pipe.gmm_ = DiagonalGMM.from_state(
            {
                "weights": data["gmm_weights"],
                "means": data["gmm_means"],
                "variances": data["gmm_variances"],
            }
        )
        pipe.encoder_ = FisherVectorEncoder(pipe.gmm_, pipe.n_regions)
        metric = CFML(reg=pipe.metric_lambda, n_components=pipe.dim)
        metric.components_ = np.asarray(data["metric_components"], dtype=np.float64)
        metric.eigenvalues_ = np.asarray(data["metric_eigenvalues"], dtype=np.float64)
        pipe.metric_ = metric
        return pipe
