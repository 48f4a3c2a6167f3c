"""Closed-form metric learning (CFML, Cheng's `DML_CFML`) with the exact low-rank reduction
(method spec §5.1).

CFML solves M_D w = γ (M_S + λI) w, where M_S / M_D are the mean outer products of pairwise
differences over same-class / different-class pairs, keeps γ > 0 in descending order and scales
each eigenvector by √γ. Every such w lies in the span of the centred training data, so the problem
is solved exactly in an r-dimensional orthonormal basis U of that span (r ≤ n − 1); since
Uᵀ(λI)U = λI_r this gives the same γ and the same B-normalised w = U a as the full F×F problem.
U is obtained from the n×n Gram matrix of the centred data, so nothing F×F is ever formed.

`CFML.fit_chunks` fits the same metric from Fisher vectors held in chunks that are read one or
two at a time (a store, memory-mapped files): the Gram matrix is assembled block by block and W
accumulated chunk by chunk, so memory grows with n² (the Gram) and one chunk, never with n·F
(issue 17: consortium-scale training).

At consortium scale even the n×n Gram is too much (n = 10⁵: 80 GB, and its eigendecomposition
O(n³)). With `max_rank = k` and more than k + 1 templates, `fit_chunks` solves the same problem
in the k leading principal directions of the centred data instead of their whole span: a
randomised range finder (Halko, Martinsson & Tropp 2011, with power iterations) over the
chunks gives an orthonormal F×k basis V, the samples' exact coordinates Z = X_c V follow in one
more pass, and CFML is solved on Z (k×k). Memory grows with n·k and F·k, never n² or n·F.
Where the data's rank is at most k the basis spans the data and the fit is the exact one; below
that it is an approximation whose retrieval cost is measured (`pecbir bench-training`).

With `solver="primal"`, `fit_chunks` solves the exact problem in the F-dimensional feature space
instead, from sufficient statistics streamed over the chunks: the F×F scatter of the samples
about their class means, the same with each sample weighted by its class size, and the class
means give M_S and M_D directly (`_fit_primal`), whatever n is. Memory is 2·F² floats and a
chunk, time n·F² for the statistics plus the F×F generalised eigensolve of the leading
`n_components` pairs (LAPACK on the CPU; LOBPCG on a torch device). It equals the dual solve:
directions outside the data's span have M_S w = M_D w = 0, so γ = 0 and they are never kept.
It is the consortium-scale path where n ≫ F (10⁵ templates, F ≈ 8·10⁴ at D = 64), where the
n×n Gram cannot be held and the rank cap loses the discriminative directions. With fewer
templates than features plus classes, M_S + λI has eigenvalues equal to λ in the directions
M_S does not reach, and LOBPCG in float32 returns spurious leading pairs there (γ ≈ 10⁴ where
the exact solve gives 1). The float32 statistics themselves are accurate (LAPACK in float64 on
them gives the exact pairs; results/gpu/primal_float32_check.py): so in that case LOBPCG runs
in float64 over the float32 statistics, each product widening a block of rows at a time
(`_float64_product`), which keeps the device memory at 2·F² float32 (50 GiB at F = 81 920,
where float64 statistics would need 100 GiB). Far below F templates even that LOBPCG may leave
spurious pairs (N = 10⁴, F = 81 920 on an H100: two, at residual 0.998, where N = 5·10⁴
converged; results/gpu/h100-s11/): a pair above `MAX_PAIR_RESIDUAL` raises a
ConvergenceWarning, and there the dual is exact and cheaper (75 s and 4.6 GiB against 192 s
and 53 GiB).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning

log = logging.getLogger(__name__)

__all__ = ["CFML", "pair_scatter"]


def pair_scatter(Z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M_S, M_D) for samples in the rows of Z, over ordered pairs i ≠ j (spec §5.1 step 1).

    M_S (M_D) is the mean of (z_i − z_j)(z_i − z_j)ᵀ over the ordered pairs of same-class
    (different-class) samples, formed from per-class sums without enumerating the pairs.

    Parameters
    ----------
    Z : array_like of shape (n_samples, n_features)
        Samples (computed in float64).
    labels : array_like of shape (n_samples,)
        Class of each sample.

    Returns
    -------
    m_same, m_diff : ndarray of float64, shape (n_features, n_features)
        The same-class and different-class scatter matrices.

    Raises
    ------
    ValueError
        If there are no same-class pairs or no different-class pairs.

    Examples
    --------
    >>> import numpy as np
    >>> m_same, m_diff = pair_scatter(np.array([[0.0], [1.0], [3.0]]), np.array([0, 0, 1]))
    >>> m_same, m_diff  # same: (0-1)²; different: the mean of 3², 3², 2², 2²
    (array([[1.]]), array([[6.5]]))
    """
    Z = np.asarray(Z, dtype=np.float64)
    labels = np.asarray(labels)
    n = Z.shape[0]
    # in place throughout (r×r arrays are n×n in the dual solve), the same operations in the
    # same order as 2.0 * n * (Z.T @ Z) - 2.0 * np.outer(t, t), so the same bits
    total = Z.sum(axis=0)
    with _blas_threads(Z.shape[1]):
        all_pairs = Z.T @ Z
    all_pairs *= 2.0 * n
    _subtract_twice_outer(all_pairs, total)
    same = np.zeros_like(all_pairs)
    n_same = 0
    for c in np.unique(labels):
        Zc = Z[labels == c]
        nc = Zc.shape[0]
        sc = Zc.sum(axis=0)
        with _blas_threads(Z.shape[1]):
            term = Zc.T @ Zc
        del Zc
        term *= 2.0 * nc
        _subtract_twice_outer(term, sc)
        same += term
        del term
        n_same += nc * (nc - 1)
    n_diff = n * (n - 1) - n_same
    if n_same == 0 or n_diff == 0:
        raise ValueError("CFML needs at least two classes and one class with two samples")
    all_pairs -= same
    all_pairs /= n_diff
    same /= n_same
    return same, all_pairs


def _subtract_twice_outer(matrix: np.ndarray, v: np.ndarray, rows: int = 256) -> None:
    """matrix −= 2·v vᵀ in place, in blocks of rows: the bits of ``matrix - 2.0 * np.outer(v,
    v)`` without an r×r temporary."""
    for start in range(0, len(v), rows):
        block = np.outer(v[start : start + rows], v)
        block *= 2.0
        matrix[start : start + rows] -= block


class CFML(BaseEstimator):
    """Closed-form metric learning; `transform(X)` gives z = Wᵀx with W (F × n_components).

    Parameters
    ----------
    reg : float, default=1.5e-4
        The ridge λ added to M_S (Cheng's value).
    n_components : int, default=10
        Output dimension `dim`: the first columns of the √γ-scaled eigenvector matrix.
    rtol : float, default=1e-10
        Relative cut-off on the (squared) singular values of the centred data when building
        the basis of its span.
    copy : bool, default=True
        False lets `fit` centre a float32/float64 X in place (saves one n×F copy).
    max_rank : int or None, default=None
        `fit_chunks` only: with more than ``max_rank + 1`` samples, solve in the `max_rank`
        leading principal directions (randomised, see the module doc) instead of the n×n Gram.
        None: always the exact Gram solve.
    power_iterations : int, default=2
        Power iterations of the randomised range finder (`max_rank` only).
    solver : {"dual", "primal"}, default="dual"
        `fit_chunks` only: "dual" solves in the span of the samples (the n×n Gram, or the
        `max_rank` cap); "primal" in the feature space from streamed F×F statistics (module
        doc), exact and independent of n in memory.
    random_state : int, default=0
        Seed of the range finder's test matrix (`max_rank` only).
    max_iter : int, default=1000
        LOBPCG iterations at most (``solver="primal"`` on a torch device): where the wanted
        eigenvalues cluster, LOBPCG may never reach its tolerance, and each iteration
        at F = 81 920 is several products with the two F×F matrices (`eigen_residuals_` says
        how far the pairs got; a ConvergenceWarning where one is above `MAX_PAIR_RESIDUAL`).

    Attributes
    ----------
    components_ : ndarray of float64, shape (n_features, m)
        W: the learned projection, m = number of positive eigenvalues kept
        (≤ `n_components`).
    eigenvalues_ : ndarray of float64, shape (m,)
        The leading positive generalised eigenvalues γ, in descending order.
    rank_ : int
        Dimension r of the span of the centred training data the problem is solved in.
    eigen_residuals_ : ndarray of float64, shape (m,) or None
        `fit_chunks` with ``solver="primal"`` on a torch device only (LOBPCG, iterations
        capped): each kept pair's relative residual ‖M_D a − γ B a‖ / (‖M_D a‖ + γ‖B a‖),
        B = M_S + λI; None where a direct solver gave the pairs.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.repeat([0, 1, 2], 10)
    >>> X = rng.standard_normal((30, 6)) + 3.0 * np.eye(6)[labels]
    >>> metric = CFML(n_components=2).fit(X, labels)
    >>> metric
    CFML(n_components=2)
    >>> metric.rank_, metric.components_.shape
    (6, (6, 2))
    >>> metric.transform(X).shape
    (30, 2)
    """

    def __init__(
        self,
        *,
        reg: float = 1.5e-4,
        n_components: int = 10,
        rtol: float = 1e-10,
        copy: bool = True,
        max_rank: int | None = None,
        power_iterations: int = 2,
        random_state: int = 0,
        solver: str = "dual",
        max_iter: int = 1000,
    ) -> None:
        self.reg = reg
        self.n_components = n_components
        self.rtol = rtol
        self.copy = copy
        self.max_rank = max_rank
        self.power_iterations = power_iterations
        self.random_state = random_state
        self.solver = solver
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, labels: np.ndarray) -> CFML:
        """Learn W from labelled training vectors.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Training vectors (Fisher vectors); float32 input keeps the n×F work in float32.
        labels : array_like of shape (n_samples,)
            Class of each training vector (at least two classes, one with two samples).

        Returns
        -------
        CFML
            This estimator, fitted.

        Raises
        ------
        ValueError
            If X and labels do not match, `n_components` is below 1, or the classes give no
            same- or different-class pairs.
        """
        centred, gram = self._centred_gram(X, labels)
        V, s = self._gram_basis(gram)
        del gram  # overwritten by the eigensolve: n² bytes that the rest does not need
        coeffs = self._span_coefficients(V, s, labels)
        self.components_ = (centred.T @ coeffs.astype(centred.dtype)).astype(np.float64)
        return self  # W = U A √γ

    def fit_path(self, X: np.ndarray, labels: np.ndarray, regs: Sequence[float]) -> list[CFML]:
        """One fitted metric per ridge λ in `regs`, the λ-independent work done once.

        The centred copy, the n×n Gram matrix, its eigendecomposition and the scatter matrices
        in the span basis do not depend on λ: only the r×r generalised eigensolve and W are
        repeated.  Each returned estimator equals ``CFML(reg=λ, <this one's parameters>)
        .fit(X, labels)`` (the same operations in the same order: bit for bit).

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Training vectors, as in `fit` (with ``copy=False`` centred in place, once).
        labels : array_like of shape (n_samples,)
            Class of each training vector.
        regs : sequence of float
            The ridge values λ, in the order of the returned estimators.

        Returns
        -------
        list of CFML
            Fitted copies of this estimator with ``reg`` set to each λ; this one is not fitted.

        Raises
        ------
        ValueError
            As `fit`, or if `regs` is empty.

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat([0, 1, 2], 10)
        >>> X = rng.standard_normal((30, 6)) + 3.0 * np.eye(6)[labels]
        >>> small, large = CFML(n_components=2).fit_path(X, labels, [1e-4, 1.0])
        >>> small.reg, large.reg
        (0.0001, 1.0)
        >>> bool(np.array_equal(large.components_, CFML(n_components=2, reg=1.0).fit(X, labels)
        ...     .components_))
        True
        """
        from sklearn.base import clone

        regs = [float(reg) for reg in regs]
        if not regs:
            raise ValueError("fit_path needs at least one ridge value")
        centred, gram = self._centred_gram(X, labels)
        V, s = self._gram_basis(gram)
        m_same, m_diff = pair_scatter(V * s, labels)
        fitted = []
        for reg in regs:
            metric = clone(self).set_params(reg=reg)
            # _solve_scatter overwrites both
            scaled = metric._solve_scatter(
                m_same.copy(), m_diff.copy(), _BlockProducts(None, np.float64)
            )
            coeffs = (V / s) @ scaled
            metric.components_ = (centred.T @ coeffs.astype(centred.dtype)).astype(np.float64)
            fitted.append(metric)
        return fitted

    def _check_params(self) -> None:
        """Refuse parameters no fit accepts, before any data is read."""
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")
        if self.solver not in ("dual", "primal"):
            raise ValueError(f"solver must be 'dual' or 'primal', got {self.solver!r}")

    def _centred_gram(self, X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the centred samples, their n×n Gram matrix in float64), after `fit`'s checks."""
        X = np.asarray(X)
        labels = np.asarray(labels)
        if X.ndim != 2 or X.shape[0] != labels.shape[0]:
            raise ValueError(f"X {X.shape} and labels {labels.shape} do not match")
        self._check_params()
        # One centred copy in the input's precision: float32 Fisher vectors (as in Cheng's
        # MATLAB code) keep the n×F copy and the n×n Gram product in float32, 4x faster and
        # half the memory of float64 at F = 83k; everything after the Gram is float64.
        dtype = np.float32 if X.dtype == np.float32 else np.float64
        centred = np.array(X, dtype=dtype, copy=self.copy or None)
        centred -= centred.mean(axis=0, dtype=np.float64).astype(dtype)
        with _blas_threads(centred.shape[0]):
            gram = centred @ centred.T
        return centred, gram.astype(np.float64)  # n×n, = V S² Vᵀ

    def fit_chunks(
        self,
        chunks: Sequence[np.ndarray],
        labels: np.ndarray,
        *,
        device: str | None = None,
    ) -> CFML:
        """Learn W from training vectors held in chunks, never all at once (see module doc).

        Equal to `fit` on the concatenated chunks up to float32 summation order. With c chunks,
        each is read at most c + 2 times (mean, Gram blocks, W); two chunks and the n×n Gram
        (with LAPACK's work space) are in memory. With `max_rank` below n − 1, the randomised
        subspace solve instead (module doc): each chunk is read 2·`power_iterations` + 4 times
        and memory holds one chunk, n×(k + 64) and F×(k + 64) floats.

        Parameters
        ----------
        chunks : sequence of array_like of shape (n_i, n_features)
            The training vectors in row blocks, in `labels` order; each `chunks[i]` may load
            from storage (a memory-mapped `.npy`, a store read). float32 blocks keep the
            products in float32, as `fit` does.
        labels : array_like of shape (n_samples,)
            Class of each training vector, n_samples = Σ n_i.
        device : str, optional
            A torch device for the block products (the `[gpu]` extra); None uses numpy.

        Returns
        -------
        CFML
            This estimator, fitted.

        Raises
        ------
        ValueError
            If the chunks and labels do not match, or as `fit`.
        """
        labels = np.asarray(labels)
        sizes = [int(np.shape(chunks[i])[0]) for i in range(len(chunks))]
        if not sizes or sum(sizes) != labels.shape[0]:
            raise ValueError(f"chunks of {sum(sizes)} rows but {labels.shape[0]} labels")
        self._check_params()
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        first = np.asarray(chunks[0])
        dtype = np.float32 if first.dtype == np.float32 else np.float64
        n, n_classes, n_features = int(offsets[-1]), len(np.unique(labels)), first.shape[1]
        # below F + classes templates M_S + λI equals λ where M_S does not reach, and float32
        # LOBPCG there gives spurious pairs: the float32 statistics are then multiplied in
        # float64 (module doc)
        float32_device = device is not None and dtype == np.float32
        rank_deficient = n - n_classes < n_features
        products = _BlockProducts(device, dtype, float64_solve=float32_device and rank_deficient)
        if self.solver == "primal":  # its statistics centre each sample on its class's mean
            self.components_ = self._fit_primal(
                lambda i: np.asarray(chunks[i], dtype=dtype), offsets, labels, products
            )
            return self
        total = np.zeros(n_features, dtype=np.float64)
        for i in range(len(chunks)):
            total += np.asarray(chunks[i]).sum(axis=0, dtype=np.float64)
        mean = (total / offsets[-1]).astype(dtype)

        def centred(i: int) -> np.ndarray:
            return np.asarray(chunks[i], dtype=dtype) - mean

        if self.max_rank is not None and offsets[-1] - 1 > self.max_rank:
            basis = self._principal_basis(centred, offsets, n_features, products)
            Z = np.concatenate(
                [products.numpy(products.put(centred(i)) @ basis) for i in range(len(chunks))]
            ).astype(np.float64)
            A_scaled = self._solve_coordinates(Z, labels)
            self.components_ = products.numpy(basis).astype(np.float64) @ A_scaled
            return self
        gram = np.empty((offsets[-1], offsets[-1]), dtype=np.float64)
        for i in range(len(chunks)):
            rows = slice(offsets[i], offsets[i + 1])
            outer = products.put(centred(i))
            for j in range(i + 1):
                inner = outer if j == i else products.put(centred(j))
                block = products.gram(outer, inner)
                gram[rows, offsets[j] : offsets[j + 1]] = block
                gram[offsets[j] : offsets[j + 1], rows] = block.T
            del outer
        V, s = self._gram_basis(gram)
        del gram
        coeffs = self._span_coefficients(V, s, labels)
        del V
        components = np.zeros((n_features, coeffs.shape[1]), dtype=np.float64)
        for i in range(len(chunks)):
            part = coeffs[offsets[i] : offsets[i + 1]].astype(dtype)
            components += products.weighted(products.put(centred(i)), part)
        self.components_ = components
        return self

    def _span_coefficients(self, V: np.ndarray, s: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The n × m coefficients of W in the centred samples, from their Gram matrix's basis
        (`_gram_basis`); sets `eigenvalues_` and `rank_`."""
        # the coordinates of the centred samples in U = centredᵀ V S⁻¹ (rows = samples), V·s,
        # live only inside pair_scatter, and V / s only once the r×r scatters are gone: at
        # r ≈ n every array here is n×n
        m_same, m_diff = pair_scatter(V * s, labels)
        A_scaled = self._solve_scatter(m_same, m_diff, _BlockProducts(None, np.float64))
        del m_same, m_diff
        return (V / s) @ A_scaled  # n × m

    def _gram_basis(self, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(V, s) of the Gram matrix's eigenpairs above `rtol` (it overwrites the Gram): the
        centred samples' coordinates in the orthonormal basis of their span are V·s."""
        np.add(gram, gram.T, out=gram)  # symmetrise in place: (g + gᵀ)·½, no third n×n array
        gram *= 0.5
        with _blas_threads(gram.shape[0]):
            eigenvalues, V = scipy.linalg.eigh(gram, driver="evd", overwrite_a=True)
        keep = eigenvalues > self.rtol * max(float(eigenvalues.max()), 1e-300)
        return V[:, keep], np.sqrt(eigenvalues[keep])

    def _fit_primal(self, read, offsets: np.ndarray, labels: np.ndarray, products):
        """W (F × m) from the F×F statistics of the chunks (`read(i)`, module doc).

        Each sample is centred on its class's mean x̄_c, so that no two large terms cancel:
        over same-class pairs Σ (x_i − x_j)(x_i − x_j)ᵀ = Σ_c 2n_c W_c, over all pairs
        2n·S_T, with W_c = Σ_{i∈c} (x_i − x̄_c)(x_i − x̄_c)ᵀ and S_T = Σ_c W_c +
        Σ_c n_c (x̄_c − x̄)(x̄_c − x̄)ᵀ. (`pair_scatter`'s 2n_c G_c − 2 s_c s_cᵀ subtracts two
        terms of the class means' size: in float32 at F = 8 192, N = 4 000 that moved the
        leading γ by 0.27 % where this form moves it by less than 0.005 %;
        results/gpu/primal_float32_check.txt.)
        """
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        n = int(offsets[-1])
        n_same = int((counts * (counts - 1)).sum())
        n_diff = n * (n - 1) - n_same
        if n_same == 0 or n_diff == 0:
            raise ValueError("CFML needs at least two classes and one class with two samples")
        class_sums = None
        for i in range(len(offsets) - 1):  # one pass for the class means
            members, host = inverse[offsets[i] : offsets[i + 1]], read(i)
            if class_sums is None:
                class_sums = np.zeros((len(classes), host.shape[1]))
            for c in np.unique(members):
                class_sums[c] += host[members == c].sum(axis=0, dtype=np.float64)
        means = class_sums / counts[:, None]
        n_features = means.shape[1]
        # Only the two F×F statistics are ever F×F: every update is accumulated in place
        # (at F = 81 920 one more float32 F×F temporary would not fit an 80 GB device).
        scatter = products.zeros((n_features, n_features))  # Σ_c W_c, then S_T, then M_D
        weighted = products.zeros((n_features, n_features))  # Σ_c 2n_c W_c, then M_S
        started = time.perf_counter()
        for i in range(len(offsets) - 1):
            members = inverse[offsets[i] : offsets[i + 1]]
            block = products.put(read(i) - means[members].astype(products.dtype))
            products.add_product(scatter, block, block)
            weights = (2.0 * counts[members]).astype(products.dtype)[:, None]
            products.add_product(weighted, block, block * products.put(weights))
            del block
        spread = np.sqrt(counts)[:, None] * (means - class_sums.sum(axis=0) / n)
        spread = products.put(spread.astype(products.dtype))  # C × F
        products.add_product(scatter, spread, spread)  # S_T
        scatter *= 2.0 * n  # all-pairs sum
        scatter -= weighted  # different-class pair sum
        scatter /= n_diff  # M_D
        weighted /= n_same  # M_S
        log.info(
            "primal statistics of %d samples, F = %d: %.1f s",
            n,
            n_features,
            time.perf_counter() - started,
        )
        A_scaled = self._solve_scatter(weighted, scatter, products)
        return A_scaled  # the basis is the identity: W = A·√γ

    def _solve_coordinates(self, Z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """A·√γ (r × m) from the samples' coordinates Z (n × r) in an orthonormal basis of the
        space solved in; sets `eigenvalues_` and `rank_`."""
        m_same, m_diff = pair_scatter(Z, labels)
        return self._solve_scatter(m_same, m_diff, _BlockProducts(None, np.float64))

    def _solve_scatter(self, m_same, m_diff, products) -> np.ndarray:
        """A·√γ (r × m): the leading `n_components` positive generalised eigenpairs of
        M_D a = γ (M_S + λI) a, B-normalised, from r×r scatter matrices (numpy or on a torch
        device, whose arrays it overwrites); sets `eigenvalues_`, `rank_` and
        `eigen_residuals_`."""
        r = m_same.shape[0]
        if products.torch is not None:
            gammas, A, residuals = products.generalized_top(
                m_diff, m_same, self.reg, self.n_components, self.max_iter
            )
            self.eigenvalues_, self.rank_, self.eigen_residuals_ = gammas, int(r), residuals
            return A * np.sqrt(gammas)
        self.eigen_residuals_ = None
        # only the leading n_components eigenpairs are ever used: ask LAPACK for just those
        # (B-normalised like the full solve; about 10x faster than all r of them)
        n_wanted = min(self.n_components, r)
        with _blas_threads(r):
            gammas, A = scipy.linalg.eigh(
                np.asarray(m_diff, dtype=np.float64),
                _add_to_diagonal(np.asarray(m_same, dtype=np.float64), self.reg),
                subset_by_index=[r - n_wanted, r - 1],
                overwrite_a=True,
                overwrite_b=True,
            )
        order = np.argsort(gammas)[::-1]
        gammas, A = gammas[order], A[:, order]
        positive = gammas > 0
        gammas, A = gammas[positive], A[:, positive]
        self.eigenvalues_ = gammas  # the leading (≤ n_components) positive eigenvalues
        self.rank_ = int(r)
        return A * np.sqrt(gammas)

    def _principal_basis(self, centred, offsets: np.ndarray, n_features: int, products):
        """An orthonormal F × k basis of the centred data's k leading principal directions
        (randomised range finder with power iterations, over the chunks; in `products`'
        array type). k = min(max_rank, F); directions below `rtol` are dropped."""
        k = min(int(self.max_rank), n_features)
        width = min(k + 64, n_features)  # oversampling: the range finder's accuracy margin
        rng = np.random.default_rng(self.random_state)
        test = products.put(rng.standard_normal((n_features, width)).astype(products.dtype))
        parts = range(len(offsets) - 1)

        def range_of(right):  # an orthonormal basis of X_c @ right's columns, n × width
            return products.qr(products.cat([products.put(centred(i)) @ right for i in parts]))

        def transposed_times(left):  # X_cᵀ @ left, F × width
            total = None
            for i in parts:
                block = products.put(centred(i)).T @ left[offsets[i] : offsets[i + 1]]
                total = block if total is None else total + block
            return total

        Q = range_of(test)
        for _ in range(self.power_iterations):
            Q = range_of(products.qr(transposed_times(Q)))
        B = products.numpy(transposed_times(Q)).astype(np.float64)  # F × width, X_cᵀ Q
        squares, G = np.linalg.eigh(B.T @ B)  # B = V S Gᵀ: S² and G, ascending
        order = np.argsort(squares)[::-1][:k]
        squares, G = squares[order], G[:, order]
        keep = squares > self.rtol * max(float(squares[0]), 1e-300)
        V = (B @ G[:, keep]) / np.sqrt(squares[keep])
        return products.put(V.astype(products.dtype))

    def transform(self, X: np.ndarray, n_components: int | None = None) -> np.ndarray:
        """Project the rows of X with the first columns of W.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Vectors to project (converted to float64 in blocks of 512 rows).
        n_components : int, optional
            How many learned dimensions to use; all of them by default.

        Returns
        -------
        ndarray of float64, shape (n_samples, m)
            The projections, m = min(n_components, learned).
        """
        m = self.components_.shape[1] if n_components is None else n_components
        W = self.components_[:, :m]
        X = np.asarray(X)
        out = np.empty((X.shape[0], W.shape[1]), dtype=np.float64)
        for start in range(0, X.shape[0], 512):  # float64 without copying all of X at once
            out[start : start + 512] = X[start : start + 512].astype(np.float64) @ W
        return out


#: From this side of a symmetric product's or eigensolve's matrix on, BLAS and LAPACK run on
#: one thread. OpenBLAS's threaded syrk (aᵀa and a aᵀ; also inside Cholesky and eigh) crashes
#: the process (SIGSEGV) on this 2-core SkylakeX machine, in SciPy's 0.3.30 and numpy's
#: 0.3.31 alike, from an output side near 16 000 (probed: 16 000 × 1 000 and 20 000 × 500
#: crash, 15 000 × 4 000 and 14 000 × 3 000 do not; gemm of two arrays did not); one thread
#: does not. A margin below the first crash seen.
_ONE_THREAD_FROM = 12_000


def _blas_threads(side: int):
    """The BLAS thread limit for symmetric products and eigensolves whose matrices have this
    side (`_ONE_THREAD_FROM`)."""
    if side < _ONE_THREAD_FROM:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _add_to_diagonal(matrix: np.ndarray, value: float) -> np.ndarray:
    """matrix + value·I in place (the bits of `matrix + value * np.eye(r)`, without two more
    r×r arrays)."""
    matrix[np.diag_indices(matrix.shape[0])] += value
    return matrix


class _BlockProducts:
    """The two products `CFML.fit_chunks` needs, in numpy or on a torch device."""

    def __init__(self, device: str | None, dtype: type, *, float64_solve: bool = False) -> None:
        self.dtype = dtype
        self.float64_solve = float64_solve  # LOBPCG over float32 matrices in float64
        self.torch = None
        if device is not None:
            import torch

            from pecore.torch_features import resolve_device

            self.torch = torch
            self.device = resolve_device(device)

    def put(self, block: np.ndarray):  # -> ndarray or torch.Tensor
        if self.torch is None:
            return block
        return self.torch.as_tensor(block, device=self.device)

    def gram(self, a, b) -> np.ndarray:
        """a bᵀ as float64 (computed in the blocks' precision)."""
        if self.torch is None:
            return (a @ b.T).astype(np.float64)
        return (a @ b.T).to(self.torch.float64).cpu().numpy()

    def weighted(self, a, coeffs: np.ndarray) -> np.ndarray:
        """aᵀ coeffs as float64 (computed in the blocks' precision)."""
        if self.torch is None:
            return (a.T @ coeffs).astype(np.float64)
        weights = self.torch.as_tensor(coeffs, device=self.device)
        return (a.T @ weights).to(self.torch.float64).cpu().numpy()

    def numpy(self, a) -> np.ndarray:
        return a if self.torch is None else a.cpu().numpy()

    def add_product(self, acc, a, b, *, alpha: float = 1.0) -> None:
        """acc += alpha · aᵀ b, in place (on a torch device without an acc-sized temporary)."""
        if self.torch is None:
            with _blas_threads(acc.shape[0]):
                product = a.T @ b
            if alpha != 1.0:
                product *= alpha
            acc += product
        else:
            acc.addmm_(a.T, b, alpha=alpha)

    def qr(self, a):
        """An orthonormal basis of a's columns (reduced QR's Q)."""
        if self.torch is None:
            return np.linalg.qr(a, mode="reduced")[0]
        return self.torch.linalg.qr(a, mode="reduced")[0]

    def cat(self, blocks: list):
        return np.concatenate(blocks) if self.torch is None else self.torch.cat(blocks)

    def zeros(self, shape: tuple[int, ...]):
        if self.torch is None:
            return np.zeros(shape, dtype=self.dtype)
        dtype = self.torch.float32 if self.dtype == np.float32 else self.torch.float64
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def generalized_top(self, m_diff, m_same, reg: float, n_wanted: int, max_iter: int):
        """(γ, A, residuals) of the leading positive pairs of M_D a = γ (M_S + reg·I) a on the
        device, float64 on return, B-normalised: LOBPCG (torch.lobpcg), which needs only
        products with the two F×F matrices (it overwrites m_same with M_S + reg·I).

        Iterations are capped (`max_iter`): where the wanted eigenvalues cluster
        (synthetic Gaussian templates put eight of the ten wanted within 10⁻⁵ of each
        other) LOBPCG in float32 may never reach its tolerance, and an uncapped run did not
        return in six minutes on an H100. The residuals say how far the pairs got."""
        torch = self.torch
        m_same.diagonal().add_(reg)
        if self.float64_solve and m_same.dtype == torch.float32:
            m_diff, m_same = _float64_product(m_diff), _float64_product(m_same)
        r = m_same.shape[0]
        k = min(n_wanted, max(r // 3, 1))
        generator = torch.Generator(device="cpu").manual_seed(0)
        start = torch.randn((r, k), generator=generator, dtype=m_same.dtype).to(m_same.device)
        # converged to a residual near the precision's square root of ε (float32: 1e-4 of
        # the matrices' scale, float64: 1e-8), as far as that precision can resolve pairs
        tol = 1e-4 if m_same.dtype == torch.float32 else 1e-8
        started = time.perf_counter()

        def progress(worker) -> None:  # the F×F solve can take minutes: say how far it is
            step = worker.ivars["istep"]
            if step % 50 == 0:
                log.info(
                    "LOBPCG step %d, %d of %d converged, %.1f s",
                    step,
                    worker.ivars.get("converged_count", 0),
                    k,
                    time.perf_counter() - started,
                )

        gammas, A = torch.lobpcg(
            m_diff,
            k=k,
            B=m_same,
            X=start,
            largest=True,
            niter=max_iter,
            tol=tol,
            tracker=progress,
        )
        log.info("LOBPCG: %.1f s", time.perf_counter() - started)
        pushed, pulled = m_diff @ A, m_same @ A
        residuals = torch.linalg.vector_norm(pushed - pulled * gammas, dim=0) / (
            torch.linalg.vector_norm(pushed, dim=0)
            + gammas.abs() * torch.linalg.vector_norm(pulled, dim=0)
        ).clamp(min=torch.finfo(A.dtype).tiny)
        gammas, A = gammas.double().cpu().numpy(), A.double().cpu().numpy()
        residuals = residuals.double().cpu().numpy()
        order = np.argsort(gammas)[::-1]
        gammas, A, residuals = gammas[order], A[:, order], residuals[order]
        positive = gammas > 0
        if not positive.any():
            raise ValueError(
                f"LOBPCG returned no positive generalised eigenvalue in {max_iter} iterations: "
                "raise max_iter"
            )
        worst = float(residuals[positive].max())
        if worst > MAX_PAIR_RESIDUAL:
            # LOBPCG's best after max_iter, not eigenpairs: such a pair may be a fair leading
            # direction or a spurious mixture (γ between the leading pairs and the cluster,
            # residual near 1: the float32 primal fit at N = 10⁴, F = 81 920)
            warnings.warn(
                f"LOBPCG in {max_iter} iterations left pairs at relative residual up to "
                f"{worst:.2g} (above {MAX_PAIR_RESIDUAL:g}): not eigenpairs; raise max_iter, "
                "or use the dual solver where there are fewer templates than features",
                ConvergenceWarning,
                stacklevel=5,  # fit_chunks' caller
            )
        return gammas[positive], A[:, positive], residuals[positive]


#: Largest relative residual of a pair LOBPCG returns without a ConvergenceWarning: pairs
#: that solve the eigen-equation to two digits. Measured on an H100 at F = 81 920
#: (results/gpu/h100-s11/): converged pairs ≤ 1.1·10⁻², spurious or unconverged ones ≥ 0.5.
MAX_PAIR_RESIDUAL = 0.02

#: Rows of a float32 matrix widened at a time by `_float64_product` (2 048 × 81 920 doubles:
#: 1.3 GB of scratch on the device).
FLOAT64_ROWS = 2048


def _float64_product(stored):  # torch.Tensor -> torch.Tensor
    """A float32 square matrix on a torch device that `torch.lobpcg` multiplies in float64.

    LOBPCG needs only products with its matrices (and their shape, dtype and device). This
    tensor reports float64 and answers each product by widening `FLOAT64_ROWS` rows of the
    stored float32 matrix at a time, so the F×F statistics stay float32 (at F = 81 920 two
    float64 copies would need 100 GiB; a device of 80 GB holds the float32 pair) while every
    sum is taken in float64. Any other operation on it raises.
    """
    return _float64_product_type()(stored)


@functools.cache
def _float64_product_type() -> type:
    import torch  # the [gpu] extra: defined on first use

    class Float64Product(torch.Tensor):
        @staticmethod
        def __new__(cls, stored):
            return torch.Tensor._make_wrapper_subclass(
                cls, stored.shape, dtype=torch.float64, device=stored.device
            )

        def __init__(self, stored) -> None:
            self.stored = stored

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            # torch's own code runs as is (its results stay plain tensors); only the
            # products with this matrix reach __torch_dispatch__
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            products = (torch.ops.aten.mm.default, torch.ops.aten.matmul.default)
            if func not in products or not isinstance(args[0], cls) or kwargs:
                raise NotImplementedError(f"{func} on a float32 matrix multiplied in float64")
            matrix, block = args
            out = block.new_empty((matrix.shape[0], block.shape[1]))
            for start in range(0, matrix.shape[0], FLOAT64_ROWS):
                rows = slice(start, start + FLOAT64_ROWS)
                torch.mm(matrix.stored[rows].double(), block, out=out[rows])
            return out

    return Float64Product
