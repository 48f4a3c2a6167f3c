"""Why `CFML(solver="primal").fit_chunks` refuses float32 on a torch device below F + classes
templates: the float32 statistics and LOBPCG (torch, CPU here) against the float64 LAPACK solve,
with fewer and with more templates than features.

Synthetic templates as `pecbir bench-training` draws them (three classes). The float32 solve is
run through `CFML._fit_primal`, past the refusal in `fit_chunks`. Prints, per N: the leading
eigenvalues of each, the largest LOBPCG residual, and the smallest cosine between the two
leading directions of each torch fit and the LAPACK one; float64 on the torch device (what
`bench-training --dtype float64` measures) is the remedy checked on the last line.

    PYTHONPATH=libs/cli .venv/bin/python results/gpu/primal_float32_check.py 2048 1000,4000 300
"""

import sys

import numpy as np

from pecbir.commands.bench_training import _labels
from pecore.metric import CFML, _BlockProducts

F, CHUNK = int(sys.argv[1]), 500
MAX_ITER = int(sys.argv[3])


def leading_plane(components: np.ndarray) -> np.ndarray:
    return np.linalg.qr(components[:, :2])[0]


for n in [int(v) for v in sys.argv[2].split(",")]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, F)).astype(np.float32)
    labels = _labels(n)
    X = rng.standard_normal((n, F), dtype=np.float32) + 0.3 * centres[labels]
    exact = CFML(n_components=10, solver="primal").fit_chunks([X.astype(np.float64)], labels)
    mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
    chunks = [X[i : i + CHUNK] - mean for i in range(0, n, CHUNK)]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
    fit = CFML(n_components=10, solver="primal", max_iter=MAX_ITER)
    fit.components_ = fit._fit_primal(
        chunks.__getitem__, offsets, labels, F, _BlockProducts("cpu", np.float32)
    )
    cosines = np.linalg.svd(
        leading_plane(exact.components_).T @ leading_plane(fit.components_), compute_uv=False
    )
    print(f"F = {F}, N = {n} ({'fewer' if n - 3 < F else 'more'} templates than F + classes)")
    print(f"  float64 LAPACK  eigenvalues {np.array2string(exact.eigenvalues_[:5], precision=4)}")
    print(f"  float32 LOBPCG  eigenvalues {np.array2string(fit.eigenvalues_[:5], precision=4)}")
    print(
        f"  float32 residual max {fit.eigen_residuals_.max():.2e}, "
        f"leading-plane cosine min {cosines.min():.5f}"
    )
    float64 = CFML(n_components=10, solver="primal", max_iter=MAX_ITER)
    float64.fit_chunks([X.astype(np.float64)], labels, device="cpu")
    cosines = np.linalg.svd(
        leading_plane(exact.components_).T @ leading_plane(float64.components_),
        compute_uv=False,
    )
    print(
        f"  float64 LOBPCG  eigenvalues {np.array2string(float64.eigenvalues_[:5], precision=4)}"
        f", residual max {float64.eigen_residuals_.max():.2e}, "
        f"leading-plane cosine min {cosines.min():.5f}"
    )
