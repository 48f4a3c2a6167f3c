"""How far float32 LOBPCG (primal CFML on torch, CPU here) is from the exact solve, by iterations.

Synthetic templates as `pecbir bench-training` draws them (three classes), F features, N
templates; the reference is the numpy primal solve (LAPACK). Prints, per iteration cap: the top
eigenvalues, the smallest cosine between the two leading (discriminative) directions of both
fits, the correlation of the 10-D metric's pairwise distances on 600 held-out samples, the
overlap of their top-10 neighbour lists, and the largest LOBPCG residual.

    PYTHONPATH=libs/cli .venv/bin/python results/gpu/lobpcg_check.py 8192 16000 25,50
"""

import sys
import time

import numpy as np

from pecbir.commands.bench_training import _labels
from pecore.metric import CFML

F, N, CHUNK, HELD_OUT = int(sys.argv[1]), int(sys.argv[2]), 2000, 600


def neighbours(distances: np.ndarray) -> np.ndarray:
    return np.argsort(distances + np.eye(len(distances)) * 1e18, axis=1)[:, :10]


def pairwise(z: np.ndarray) -> np.ndarray:
    return ((z[:, None] - z[None]) ** 2).sum(-1)


def leading_plane(components: np.ndarray) -> np.ndarray:
    return np.linalg.qr(components[:, :2])[0]


rng = np.random.default_rng(0)
centres = rng.standard_normal((3, F)).astype(np.float32)
labels = _labels(N)
chunks = []
for start in range(0, N, CHUNK):
    block = rng.standard_normal((CHUNK, F), dtype=np.float32)
    block += 0.3 * centres[labels[start : start + CHUNK]]
    chunks.append(block)
exact = CFML(n_components=10, solver="primal").fit_chunks(chunks, labels)
test = rng.standard_normal((HELD_OUT, F), dtype=np.float32)
test += 0.3 * centres[np.arange(HELD_OUT) % 3]
reference = pairwise(exact.transform(test))
upper = np.triu_indices(HELD_OUT, 1)
print("exact eigenvalues", np.round(exact.eigenvalues_, 3))
for cap in [int(v) for v in sys.argv[3].split(",")]:
    started = time.perf_counter()
    fit = CFML(n_components=10, solver="primal", max_iter=cap)
    fit.fit_chunks(chunks, labels, device="cpu")
    seconds = time.perf_counter() - started
    distances = pairwise(fit.transform(test))
    cosines = np.linalg.svd(
        leading_plane(exact.components_).T @ leading_plane(fit.components_), compute_uv=False
    )
    correlation = np.corrcoef(reference[upper], distances[upper])[0, 1]
    overlap = np.mean(
        [
            len(set(a) & set(b)) / 10
            for a, b in zip(neighbours(reference), neighbours(distances), strict=True)
        ]
    )
    print(
        f"max_iter {cap}: {seconds:.1f} s, eig {np.round(fit.eigenvalues_[:3], 3)}, "
        f"top-2 cos min {cosines.min():.5f}, dist corr {correlation:.5f}, "
        f"top-10 overlap {overlap:.3f}, resid max {fit.eigen_residuals_.max():.1e}"
    )
