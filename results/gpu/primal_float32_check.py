"""The primal CFML on a torch device below F + classes templates: which float32 part fails.

Synthetic templates as `pecbir bench-training` draws them (three classes), F features, against
the float64 LAPACK solve. Per N, the leading eigenvalues (and, for the LOBPCG runs, the largest
residual and the smallest cosine between the two leading directions and LAPACK's) of:

1. float32 statistics and float32 LOBPCG (torch, CPU here): what `fit_chunks` did on a GPU
   until session 9 refused it below F + classes templates;
2. float32 statistics in the form used until session 9 (`pair_scatter`'s identities,
   2n·G − 2 t tᵀ and Σ_c 2n_c G_c − 2 s_c s_cᵀ), solved in float64 by LAPACK;
3. float32 statistics as `_fit_primal` accumulates them since session 10 (each sample
   centred on its class's mean: nothing cancels), solved in float64 by LAPACK;
4. those float32 statistics, float64 LOBPCG over them (what `fit_chunks` does below
   F + classes templates since session 10: each product widens a block of rows,
   `pecore.metric._float64_product`);
5. float64 statistics and float64 LOBPCG (`bench-training --dtype float64`, 2·F² doubles).

Session 9 blamed the statistics' round-off. Lines 2 to 4 show that float32 LOBPCG is what
returns the spurious pairs; the statistics are accurate enough to solve in float64, and more
so class-centred (their error in the leading γ grows with F and N in the old form). So the
fix keeps the statistics in float32 (2·F² floats: an 80 GB device at F = 81 920) and takes
LOBPCG's products in float64.

    PYTHONPATH=libs/cli .venv/bin/python results/gpu/primal_float32_check.py 2048 1000,4000 300
    PYTHONPATH=libs/cli .venv/bin/python results/gpu/primal_float32_check.py 8192 4000 300

(the .txt holds the two outputs, one after the other)
"""

import sys

import numpy as np
import scipy.linalg

from pecbir.commands.bench_training import _labels
from pecore.metric import CFML, _BlockProducts

F, CHUNK = int(sys.argv[1]), 500
MAX_ITER = int(sys.argv[3])


def leading_plane(components: np.ndarray) -> np.ndarray:
    return np.linalg.qr(components[:, :2])[0]


def leading_gammas(m_diff: np.ndarray, m_same: np.ndarray, reg: float) -> np.ndarray:
    m_same = m_same.astype(np.float64)
    m_same[np.diag_indices(len(m_same))] += reg
    last = len(m_same) - 1
    pencil = (m_diff.astype(np.float64), m_same)
    return scipy.linalg.eigh(*pencil, subset_by_index=[last - 4, last])[0][::-1]


def cancelling_statistics(X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M_D, M_S) in float32 as `_fit_primal` formed them until session 9."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n = len(X)
    n_same = int((counts * (counts - 1)).sum())
    centred = X - X.mean(axis=0, dtype=np.float64).astype(np.float32)
    gram = np.zeros((X.shape[1], X.shape[1]), dtype=np.float32)
    weighted = np.zeros_like(gram)
    sums = np.zeros((len(counts), X.shape[1]))
    for start in range(0, n, CHUNK):
        block, members = centred[start : start + CHUNK], inverse[start : start + CHUNK]
        np.add.at(sums, members, block.astype(np.float64))
        gram += block.T @ block
        weighted += block.T @ (block * (2.0 * counts[members]).astype(np.float32)[:, None])
    sums32 = sums.astype(np.float32)
    weighted -= 2.0 * sums32.T @ sums32
    total = sums32.sum(axis=0, keepdims=True)
    gram *= 2.0 * n
    gram -= 2.0 * total.T @ total
    gram -= weighted
    return gram / (n * (n - 1) - n_same), weighted / n_same


def line(name: str, fit: CFML, exact: CFML) -> str:
    cosines = np.linalg.svd(
        leading_plane(exact.components_).T @ leading_plane(fit.components_), compute_uv=False
    )
    return (
        f"  {name:<38} {np.array2string(fit.eigenvalues_[:5], precision=4)}, residual max "
        f"{fit.eigen_residuals_.max():.2e}, leading-plane cosine min {cosines.min():.5f}"
    )


for n in [int(v) for v in sys.argv[2].split(",")]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, F)).astype(np.float32)
    labels = _labels(n)
    X = rng.standard_normal((n, F), dtype=np.float32) + 0.3 * centres[labels]
    exact = CFML(n_components=10, solver="primal").fit_chunks([X.astype(np.float64)], labels)
    print(f"F = {F}, N = {n} ({'fewer' if n - 3 < F else 'more'} templates than F + classes)")
    print(f"  {'float64 LAPACK':<38} {np.array2string(exact.eigenvalues_[:5], precision=4)}")
    chunks = [X[i : i + CHUNK] for i in range(0, n, CHUNK)]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
    # 1 and 3: the float32 statistics of `_fit_primal`, float32 LOBPCG and float64 LAPACK
    fit = CFML(n_components=10, solver="primal", max_iter=MAX_ITER)
    solve = fit._solve_scatter
    statistics = {}

    def keep_then_solve(m_same, m_diff, products, statistics=statistics, solve=solve):
        statistics["same"] = m_same.double().numpy()  # before the solve overwrites it
        statistics["diff"] = m_diff.double().numpy()
        return solve(m_same, m_diff, products)

    fit._solve_scatter = keep_then_solve
    fit.components_ = fit._fit_primal(
        chunks.__getitem__, offsets, labels, _BlockProducts("cpu", np.float32)
    )
    print(line("float32 statistics, float32 LOBPCG", fit, exact))
    old = leading_gammas(*cancelling_statistics(X, labels), exact.reg)
    print(f"  {'old float32 statistics, float64 LAPACK':<38} {np.array2string(old, precision=4)}")
    new = leading_gammas(statistics["diff"], statistics["same"], exact.reg)
    print(f"  {'float32 statistics, float64 LAPACK':<38} {np.array2string(new, precision=4)}")
    # 4: float64 products over them (what fit_chunks does below F + classes templates)
    now = CFML(n_components=10, solver="primal", max_iter=MAX_ITER)
    now.components_ = now._fit_primal(
        chunks.__getitem__, offsets, labels, _BlockProducts("cpu", np.float32, float64_solve=True)
    )
    print(line("float32 statistics, float64 LOBPCG", now, exact))
    # 5: float64 throughout
    float64 = CFML(n_components=10, solver="primal", max_iter=MAX_ITER)
    float64.fit_chunks([X.astype(np.float64)], labels, device="cpu")
    print(line("float64 statistics, float64 LOBPCG", float64, exact))
