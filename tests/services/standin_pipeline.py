"""Stand-in for `pecore.pipeline.CBIRPipeline`, used ONLY until the real one is on main.

Same interface (fit / fisher_vectors / project / transform / save / load, npz without pickle);
the 'Fisher vector' is an intensity histogram of the dilated-free mask region and the
'metric' a class-mean projection. Good enough to test the plumbing, nothing else.
"""

from __future__ import annotations

import io
import json
import os
import sys
import types
from typing import IO

import numpy as np


class CBIRPipeline:
    def __init__(self, n_components: int = 64, n_regions: int = 8, patch_size: int = 9,
                 radius: int = 24, pca_energy: float = 0.99, n_train_patches: int = 300_000,
                 metric_lambda: float = 1.5e-4, dim: int = 10, random_state: int = 0,
                 n_jobs: int | None = None) -> None:  # fmt: skip
        self.n_regions, self.dim, self.n_jobs = n_regions, dim, n_jobs
        self.params = {"n_regions": n_regions, "dim": dim, "random_state": random_state}

    def fisher_vectors(self, images, masks) -> np.ndarray:
        rows = []
        for image, mask in zip(images, masks, strict=True):
            inside = np.histogram(image[mask], bins=16, range=(0, 256))[0].astype(np.float64)
            rows.append(inside / max(1.0, inside.sum()))
        return np.asarray(rows, dtype=np.float32)

    def fit(self, images, masks, labels) -> CBIRPipeline:
        fv = self.fisher_vectors(images, masks).astype(np.float64)
        rng = np.random.default_rng(self.params["random_state"])
        basis = rng.standard_normal((fv.shape[1], self.dim))
        self.components_ = np.linalg.qr(basis)[0][:, : self.dim]
        return self

    def project(self, fisher_vectors: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(fisher_vectors) @ self.components_).astype(np.float32)

    def transform(self, images, masks) -> np.ndarray:
        return self.project(self.fisher_vectors(images, masks))

    def save(self, path_or_file: str | os.PathLike[str] | IO[bytes]) -> None:
        np.savez(
            path_or_file, meta_json=np.array(json.dumps(self.params)), components=self.components_
        )

    @classmethod
    def load(cls, path_or_file) -> CBIRPipeline:
        data = np.load(
            path_or_file if not isinstance(path_or_file, bytes) else io.BytesIO(path_or_file),
            allow_pickle=False,
        )
        pipe = cls(**json.loads(str(data["meta_json"])))
        pipe.components_ = data["components"]
        return pipe


def install_if_missing() -> bool:
    """Register this module as `pecore.pipeline` when the real one is absent; True if it did."""
    try:
        import pecore.pipeline  # noqa: F401

        return False
    except ImportError:
        module = types.ModuleType("pecore.pipeline")
        module.CBIRPipeline = CBIRPipeline
        sys.modules["pecore.pipeline"] = module
        return True
