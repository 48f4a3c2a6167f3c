"""Could CFML below F + classes templates be solved matrix-free, in float64, holding only the
templates (n·F floats instead of the primal's 2·F² or the dual's 5⅓·n²)? Measured: not
robustly, with SciPy's unpreconditioned LOBPCG. Kept so that the idea is not retried blind.

The probe applies M_D and M_S + λI to F × k blocks from the templates in one float64 pass each,
in the centred pair-sum forms (all pairs: 2n Σ (x − x̄)(x − x̄)ᵀ; same class: Σ_c 2n_c Σ
(x − x̄_c)(x − x̄_c)ᵀ, so no two large terms cancel, unlike the float32 primal statistics:
primal_float32_check.py), and gives them to `scipy.sparse.linalg.lobpcg` (largest=True,
seeded random start, absolute tolerance 10⁻⁷·√(trace(M_S)/F + λ)). LOBPCG asks for B·R and
then A·(R C) for a rotation C of the same block, so a block in the last one's column span
is answered from that pass (one pass per iteration). Synthetic templates as `pecbir
bench-training` draws them (three classes, n < F); the reference is `CFML.fit`, the exact
dual solve. Prints, per (n, F, n_components, iteration cap): passes over the templates, the
cosine of each of the two leading directions with the exact ones, and the leading relative
residuals.

What it shows (implicit_lobpcg_check.txt): where it converges, the pairs are the exact ones
(leading cosines 1.0000, the same γ). But (1) the (classes − 1) discriminative directions,
those M_S does not reach, appear only between 50 and 100 iterations at every size tried
(n = 600 to 4 000), since without a preconditioner LOBPCG's residuals find B's
λ-eigenspace slowly; (2) before that, SciPy returns its "best" iterate by absolute
residual, an early one with the wrong leading directions (cosine ≤ 0.07, γ ≈ 1.8 where the
exact γ is 10⁶), so a cap below that point returns a wrong metric whose other pairs look
converged; (3) with some block sizes the Cholesky of XᵀBX fails part-way (B's condition is
≈ ‖M_S‖/λ) and the solve stops there. A preconditioner near B⁻¹ would need B's inverse in
the span of the data, which is the n × n Gram the dual solve holds. So below F + classes
templates the exact options stay the dual (≈ 5⅓·n² doubles) or the float64 primal (2·F²
doubles), and at N = 5·10⁴, F = 81 920 that is about 100 GiB either way.

    PYTHONPATH=libs/cli .venv/bin/python results/gpu/implicit_lobpcg_check.py \
        > results/gpu/implicit_lobpcg_check.txt
"""

import warnings

import numpy as np
from scipy.sparse.linalg import lobpcg

from pecbir.commands.bench_training import _labels
from pecore.metric import CFML

REG = 1.5e-4  # CFML's ridge λ


class PairScatter:
    """P ↦ (M_D P, M_S P) from the centred templates, float64, one pass per new block."""

    def __init__(self, X: np.ndarray, labels: np.ndarray) -> None:
        _, self.inverse, self.counts = np.unique(labels, return_inverse=True, return_counts=True)
        n = len(X)
        self.X = X - X.mean(axis=0, dtype=np.float64).astype(X.dtype)
        rows = self.X.astype(np.float64)
        self.means = np.zeros((len(self.counts), X.shape[1]))
        np.add.at(self.means, self.inverse, rows)
        self.means /= self.counts[:, None]
        self.mean = rows.mean(axis=0)
        self.n_same = int((self.counts * (self.counts - 1)).sum())
        self.n_diff = n * (n - 1) - self.n_same
        within = ((rows - self.means[self.inverse]) ** 2).sum(axis=1)
        trace = (2.0 * self.counts[self.inverse] * within).sum() / self.n_same
        self.scale = trace / X.shape[1]
        self.passes, self.last = 0, None

    def apply(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.last is not None and self.last[0].shape == block.shape:
            rotation = np.linalg.lstsq(self.last[0], block, rcond=None)[0]
            if np.linalg.norm(self.last[0] @ rotation - block) <= 1e-10 * np.linalg.norm(block):
                return self.last[1] @ rotation, self.last[2] @ rotation
        n, k = len(self.X), block.shape[1]
        u = self.X.astype(np.float64) @ block
        g = u - self.mean @ block
        v = u - (self.means @ block)[self.inverse]
        weights = np.concatenate([2.0 * n * g, 2.0 * self.counts[self.inverse, None] * v], 1)
        acc = self.X.T.astype(np.float64) @ weights
        class_sums = np.zeros((len(self.counts), k))
        np.add.at(class_sums, self.inverse, v)
        all_pairs = acc[:, :k] - 2.0 * n * np.outer(self.mean, g.sum(axis=0))
        same = acc[:, k:] - (self.means.T * (2.0 * self.counts)) @ class_sums
        pushed, pulled = (all_pairs - same) / self.n_diff, same / self.n_same
        self.passes += 1
        self.last = (block.copy(), pushed, pulled)
        return pushed.copy(), pulled.copy()


def solve(scatter: PairScatter, k: int, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    start = np.random.default_rng(0).standard_normal((scatter.X.shape[1], k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gammas, A = lobpcg(
            lambda b: scatter.apply(b)[0],
            start,
            B=lambda b: scatter.apply(b)[1] + REG * b,
            largest=True,
            maxiter=max_iter,
            tol=1e-7 * np.sqrt(scatter.scale + REG),
        )
    failed = [str(w.message).split("\n")[0] for w in caught if "Failed" in str(w.message)]
    order = np.argsort(gammas)[::-1]
    return gammas[order], A[:, order], failed


for n, F, k, caps in [
    (600, 2048, 10, [50, 100, 1000]),
    (2000, 4096, 10, [50, 100, 1000]),
    (2000, 4096, 2, [50, 100]),
    (2000, 4096, 4, [100, 1000]),
    (4000, 8192, 10, [50, 100]),
]:
    rng = np.random.default_rng(3)
    labels = _labels(n)
    X = rng.standard_normal((n, F)).astype(np.float32)
    X += 0.3 * rng.standard_normal((3, F)).astype(np.float32)[labels]
    exact = CFML(n_components=k).fit(X.astype(np.float64), labels)
    print(
        f"n = {n}, F = {F}, n_components = {k}: "
        f"exact γ {np.array2string(exact.eigenvalues_[:3], precision=4)}"
    )
    for cap in caps:
        scatter = PairScatter(X, labels)
        gammas, A, failed = solve(scatter, k, cap)
        pushed, pulled = scatter.apply(A)
        pulled += REG * A
        residuals = np.linalg.norm(pushed - pulled * gammas, axis=0) / (
            np.linalg.norm(pushed, axis=0) + np.abs(gammas) * np.linalg.norm(pulled, axis=0)
        )
        W = exact.components_
        cosines = np.abs(np.sum(W[:, :2] * A[:, :2], 0)) / (
            np.linalg.norm(W[:, :2], axis=0) * np.linalg.norm(A[:, :2], axis=0)
        )
        print(
            f"  cap {cap:>4}: {scatter.passes:>4} passes, leading cosines "
            f"{cosines[0]:.4f} {cosines[1]:.4f}, γ {np.array2string(gammas[:3], precision=4)}, "
            f"residuals {np.array2string(residuals[:3], precision=1)}"
            + (f"; {failed[0]}" if failed else "")
        )
