"""Diagonal-covariance GMM (VLFeat-like EM) and improved Fisher vectors per subregion (spec §4).

The GMM is a small vectorised EM written here rather than sklearn's, because VLFeat *clamps*
variances at an absolute floor (1e-4) where sklearn *adds* `reg_covar`; the rest follows
`vl_gmm` defaults: k-means++ seeding of the means (one D² draw per centre, as VLFeat does),
global data variance and uniform priors as the start, ≤ 100 EM iterations, stop when the
log-likelihood improves by less than 1e-5 relative, posteriors below 1e-2/K skipped in the
M-step, and a restart of near-empty components by splitting a heavy one (spec §4.1, "any
reasonable empty-component handling").

Speed: EM passes over the 300 000 × 2Dp sample in row chunks that stay in cache (log-likelihood
product, softmax, M-step sums per chunk, chunks on `n_jobs` threads); the chunk results are added
in chunk order, so the fit does not depend on thread timing.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from sklearn.base import BaseEstimator

__all__ = ["DiagonalGMM", "FisherVectorEncoder", "moments"]

_LOG_2PI = math.log(2.0 * math.pi)
_PRIOR_EPS = 1e-6  # VLFeat: components with a smaller prior are skipped
_POSTERIOR_EPS = 1e-6  # VLFeat: posteriors below this are skipped in the FV sums
_MSTEP_POSTERIOR = 1e-2  # VLFeat: the M-step skips posteriors below this / K
_CHUNK_ROWS = 8192  # 8192 × 2·81 float32 ≈ 5 MB: one chunk's products stay in cache


def moments(y: np.ndarray) -> np.ndarray:
    """[y, y²] side by side, float32 (T, 2·Dp): one matrix product then gives both FV sums.

    Parameters
    ----------
    y : array_like of shape (n_samples, n_features)
        Projected patches.

    Returns
    -------
    ndarray of float32, shape (n_samples, 2 * n_features)
        The first moments then the second moments of each row.

    Examples
    --------
    >>> import numpy as np
    >>> moments(np.array([[1.0, 2.0], [3.0, -1.0]]))
    array([[ 1.,  2.,  1.,  4.],
           [ 3., -1.,  9.,  1.]], dtype=float32)
    """
    y = np.asarray(y, dtype=np.float32)
    return np.concatenate([y, y * y], axis=1)


@numba.njit(nogil=True, cache=True)
def _softmax_rows(log_lik: np.ndarray, floor: float) -> np.ndarray:  # pragma: no cover - numba
    """Row-wise softmax of float32 log-likelihoods in place, posteriors below `floor` set to 0
    (not renormalised, as VLFeat skips them); returns the per-row log-sum-exp (float64).
    One pass per row instead of numpy's six passes over the whole matrix."""
    n, k = log_lik.shape
    lse = np.empty(n, np.float64)
    for i in range(n):
        row = log_lik[i]
        top = row[0]
        for j in range(1, k):
            if row[j] > top:
                top = row[j]
        total = 0.0
        for j in range(k):
            e = np.exp(row[j] - top)
            row[j] = e
            total += e
        scale = 1.0 / total
        for j in range(k):
            p = row[j] * scale
            row[j] = p if p >= floor else 0.0
        lse[i] = np.log(total) + top
    return lse


def _kmeans_plusplus(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding as VLFeat does it: the first centre uniformly, every next one drawn
    with probability ∝ squared distance to the nearest centre so far (one draw, no trials)."""
    n = X.shape[0]
    norms = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    centres = np.empty((k, X.shape[1]), dtype=np.float64)
    nearest = np.full(n, np.inf)
    index = int(rng.integers(n))
    for c in range(k):
        centres[c] = X[index]
        centre = X[index].astype(np.float64)
        dist = norms - 2.0 * (X @ centre.astype(X.dtype)) + float(centre @ centre)
        np.minimum(nearest, np.maximum(dist, 0.0), out=nearest)
        if c + 1 < k:
            cumulative = np.cumsum(nearest)
            if cumulative[-1] <= 0:  # fewer distinct points than k: fall back to uniform
                index = int(rng.integers(n))
            else:
                target = rng.random() * cumulative[-1]
                index = min(int(np.searchsorted(cumulative, target, side="right")), n - 1)
    return centres


class DiagonalGMM(BaseEstimator):
    """Gaussian mixture with diagonal covariances fitted by EM (see module docstring).

    EM stops early when the log-likelihood improves by less than `tol` relative, but never
    while a component is near-empty (that one is restarted first); `tol <= 0` runs all
    `max_iter` iterations.

    Parameters
    ----------
    n_components : int, default=64
        Number of Gaussians K (the dictionary size D of the paper).
    max_iter : int, default=100
        Most EM iterations.
    tol : float, default=1e-5
        Relative log-likelihood improvement below which EM stops; <= 0 never stops early.
    var_floor : float, default=1e-4
        Absolute lower bound the variances are clamped to (VLFeat's floor).
    random_state : int or None, default=0
        Seed of the k-means++ seeding (the only randomness).
    n_jobs : int or None, default=None
        Threads for the E-/M-step chunks; None uses up to 2. The fit does not depend on it.

    Attributes
    ----------
    weights_ : ndarray of float64, shape (n_components,)
        Mixture priors.
    means_ : ndarray of float64, shape (n_components, n_features)
        Component means.
    variances_ : ndarray of float64, shape (n_components, n_features)
        Diagonal variances (each ≥ `var_floor`).
    converged_ : bool
        Whether EM stopped on `tol` before `max_iter`.
    n_iter_ : int
        EM iterations run.
    n_restarts_ : int
        Near-empty components restarted by splitting a heavy one.
    lower_bound_ : float
        Mean log-likelihood per sample before the last parameter update (−inf if none ran).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = np.concatenate([rng.normal(-5, 1, (200, 2)), rng.normal(5, 1, (200, 2))])
    >>> gmm = DiagonalGMM(n_components=2, random_state=0).fit(X)
    >>> gmm
    DiagonalGMM(n_components=2)
    >>> np.sort(gmm.means_[:, 0]).round()
    array([-5.,  5.])
    >>> gmm.weights_.round(1)
    array([0.5, 0.5])
    >>> gmm.predict_proba(X).shape
    (400, 2)
    """

    def __init__(
        self,
        *,
        n_components: int = 64,
        max_iter: int = 100,
        tol: float = 1e-5,
        var_floor: float = 1e-4,
        random_state: int | None = 0,
        n_jobs: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.var_floor = var_floor
        self.random_state = random_state
        self.n_jobs = n_jobs

    # -- parameters -> linear log-likelihood form ------------------------------------------
    def _set_mixture(self, weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> None:
        self.weights_ = np.asarray(weights, dtype=np.float64)
        self.means_ = np.asarray(means, dtype=np.float64)
        self.variances_ = np.asarray(variances, dtype=np.float64)
        inv_var = 1.0 / self.variances_
        # log N(y; μ, σ²) + log π = [y, y²] @ A + b
        self._coef = np.concatenate([(self.means_ * inv_var).T, (-0.5 * inv_var).T]).astype(
            np.float32
        )
        with np.errstate(divide="ignore"):
            log_w = np.where(self.weights_ >= _PRIOR_EPS, np.log(self.weights_), -np.inf)
        self._bias = (
            log_w
            - 0.5 * (self.means_**2 * inv_var).sum(axis=1)
            - 0.5 * np.log(self.variances_).sum(axis=1)
            - 0.5 * self.means_.shape[1] * _LOG_2PI
        ).astype(np.float32)

    def log_likelihoods(self, y_moments: np.ndarray) -> np.ndarray:
        """log π_k + log N(y_t; μ_k, σ²_k) of every sample and component.

        Parameters
        ----------
        y_moments : ndarray of float32, shape (n_samples, 2 * n_features)
            `moments(y)` of the samples y.

        Returns
        -------
        ndarray of float32, shape (n_samples, n_components)
            The weighted log-likelihoods (−inf for components with a negligible prior).
        """
        out = y_moments @ self._coef
        out += self._bias
        return out

    def predict_proba(self, y: np.ndarray) -> np.ndarray:
        """Posterior probability of each component for each sample.

        Parameters
        ----------
        y : array_like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        ndarray of float32, shape (n_samples, n_components)
            Rows sum to 1.
        """
        resp = self.log_likelihoods(moments(y))
        _softmax_rows(resp, 0.0)
        return resp

    def score(self, y: np.ndarray) -> float:
        """Mean log-likelihood per sample.

        Parameters
        ----------
        y : array_like of shape (n_samples, n_features)
            Samples.

        Returns
        -------
        float
            The mean over samples of log Σ_k π_k N(y; μ_k, σ²_k).
        """
        resp = self.log_likelihoods(moments(y))
        return float(_softmax_rows(resp, 0.0).mean())

    # -- fitting -----------------------------------------------------------------------------
    def _chunk_stats(
        self, x_moments: np.ndarray, start: int
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """E-step and M-step sums of one chunk: (Σ log-lik, Σγ, [Σγy, Σγy²])."""
        block = x_moments[start : start + _CHUNK_ROWS]
        resp = self.log_likelihoods(block)
        log_lik = float(_softmax_rows(resp, _MSTEP_POSTERIOR / self.n_components).sum())
        return log_lik, resp.sum(axis=0, dtype=np.float64), resp.T @ block

    def _full_posteriors(self, x_moments: np.ndarray) -> np.ndarray:
        resp = self.log_likelihoods(x_moments)
        _softmax_rows(resp, _MSTEP_POSTERIOR / self.n_components)
        return resp

    def fit(self, X: np.ndarray) -> DiagonalGMM:
        """Fit the mixture by EM from a k-means++ start.

        Parameters
        ----------
        X : array_like of shape (n_samples, n_features)
            Training samples (computed in float32; at least `n_components` rows).

        Returns
        -------
        DiagonalGMM
            This estimator, fitted.

        Raises
        ------
        ValueError
            If there are fewer samples than components.
        """
        from threadpoolctl import threadpool_limits

        X = np.asarray(X, dtype=np.float32)
        n, d = X.shape
        k = self.n_components
        if n < k:
            raise ValueError(f"need at least n_components={k} samples, got {n}")
        rng = np.random.default_rng(self.random_state)
        centres = _kmeans_plusplus(X, k, rng)
        global_var = np.maximum(X.astype(np.float64).var(axis=0, ddof=1), self.var_floor)
        self._set_mixture(np.full(k, 1.0 / k), centres, np.tile(global_var, (k, 1)))
        x_moments = moments(X)
        starts = range(0, n, _CHUNK_ROWS)
        jobs = max(1, self.n_jobs if self.n_jobs is not None else min(2, os.cpu_count() or 1))
        previous = -np.inf
        self.converged_ = False
        self.n_restarts_ = 0
        self.n_iter_ = 0
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(jobs) as pool:
            for iteration in range(self.max_iter):
                parts = list(pool.map(lambda s: self._chunk_stats(x_moments, s), starts))
                log_lik = math.fsum(p[0] for p in parts)
                mass = np.sum([p[1] for p in parts], axis=0)
                self.n_iter_ = iteration + 1
                starving = iteration > 1 and bool(np.any(mass < 1e-2 * max(1.0, n / k)))
                # a fit holding a near-empty component has not converged, whatever the
                # likelihood says; tol <= 0 turns the early stop off (an EM step can lose
                # a few ulps of likelihood to rounding, so "improved by < 0" is no test)
                if (
                    self.tol > 0
                    and iteration > 0
                    and not starving
                    and log_lik - previous < self.tol * abs(previous)
                ):
                    self.converged_ = True
                    break
                previous = log_lik
                if starving:
                    # rare: a component ran empty; split a heavy one (needs every posterior)
                    resp = self._full_posteriors(x_moments)
                    self.n_restarts_ += self._restart_empty(resp, X)
                    mass = resp.sum(axis=0, dtype=np.float64)
                    sums = (resp.T @ x_moments).astype(np.float64)
                else:
                    sums = np.sum([p[2] for p in parts], axis=0, dtype=np.float64)
                # (K, 2d): Σγy and Σγy² come from float32 products (2x faster than float64);
                # the variance E[y²] − μ² is then formed in float64. On the PCA-centred patches
                # μ²/σ² stays small enough for this to lose < 1e-3 relative.
                safe = np.maximum(mass, 1e-300)[:, None]
                means = sums[:, :d] / safe
                variances = np.maximum(sums[:, d:] / safe - means**2, self.var_floor)
                empty = mass <= 0
                means[empty] = self.means_[empty]
                variances[empty] = self.variances_[empty]
                self._set_mixture(mass / mass.sum(), means, variances)
        self.lower_bound_ = previous / n
        return self

    def _restart_empty(self, resp: np.ndarray, X: np.ndarray) -> int:
        """Give each near-empty component half of the heaviest component, split along its
        highest-variance dimension (points below the mean move). Edits `resp` in place."""
        n, k = resp.shape
        mass = resp.sum(axis=0)
        threshold = 1e-2 * max(1.0, n / k)
        empty = np.flatnonzero(mass < threshold)
        for j in empty:
            mass = resp.sum(axis=0)
            big = int(np.argmax(mass))
            dim = int(np.argmax(self.variances_[big]))
            members = np.flatnonzero(
                (resp.argmax(axis=1) == big) & (X[:, dim] < self.means_[big, dim])
            )
            if members.size == 0:
                continue
            resp[members, j] = resp[members, big]
            resp[members, big] = 0.0
        return int(empty.size)

    # -- persistence -------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """The fitted mixture by name (for saving without pickle; see `from_state`).

        Returns
        -------
        dict of str to ndarray
            "weights", "means" and "variances".
        """
        return {"weights": self.weights_, "means": self.means_, "variances": self.variances_}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], **params: object) -> DiagonalGMM:
        """A fitted mixture from `get_state()`'s arrays; `n_components` comes from the state.

        Parameters
        ----------
        state : dict of str to ndarray
            The arrays "weights", "means" and "variances".
        **params
            Other constructor parameters.

        Returns
        -------
        DiagonalGMM
            An estimator that evaluates the saved mixture (no fit diagnostics).
        """
        gmm = cls(n_components=int(np.asarray(state["weights"]).size), **params)  # type: ignore[arg-type]
        gmm._set_mixture(state["weights"], state["means"], state["variances"])
        return gmm


class FisherVectorEncoder(BaseEstimator):
    """Improved Fisher vectors (VLFeat `vl_fisher(..., 'Improved')`) pooled per subregion.

    Per subregion: mean and variance gradients laid out [u_1..u_K, v_1..v_K] (each Dp long),
    signed square root, L2 normalisation; an empty subregion gives zeros. The R blocks are
    concatenated in region order without re-normalisation: F = R · 2 · K · Dp. Nothing is
    learned here: the encoder is ready once its GMM is fitted.

    Parameters
    ----------
    gmm : DiagonalGMM
        The fitted mixture (the visual dictionary).
    n_regions : int, default=8
        Number of intensity-order subregions R pooled separately.

    Examples
    --------
    >>> import numpy as np
    >>> gmm = DiagonalGMM.from_state(
    ...     {
    ...         "weights": np.array([0.5, 0.5]),
    ...         "means": np.array([[-1.0, 0.0], [1.0, 0.0]]),
    ...         "variances": np.ones((2, 2)),
    ...     }
    ... )
    >>> encoder = FisherVectorEncoder(gmm, n_regions=2)
    >>> encoder.n_features
    16
    >>> y = np.random.default_rng(0).standard_normal((5, 2))
    >>> fv = encoder.encode(y, np.array([0, 3, 5]))  # rows 0-2 region 0, rows 3-4 region 1
    >>> fv.shape, fv.dtype
    ((16,), dtype('float32'))
    >>> np.linalg.norm(fv.reshape(2, -1), axis=1).round(3)  # each region L2-normalised
    array([1., 1.], dtype=float32)
    >>> empty = encoder.encode(y, np.array([0, 5, 5]))  # region 1 has no patches: zeros
    >>> np.linalg.norm(empty.reshape(2, -1), axis=1).round(3)
    array([1., 0.], dtype=float32)
    """

    def __init__(self, gmm: DiagonalGMM, *, n_regions: int = 8) -> None:
        self.gmm = gmm
        self.n_regions = n_regions

    @property
    def n_features(self) -> int:
        """Length F = n_regions · 2 · K · Dp of one Fisher vector."""
        k, d = self.gmm.means_.shape
        return self.n_regions * 2 * k * d

    def encode(
        self, y: np.ndarray, bounds: np.ndarray, y_moments: np.ndarray | None = None
    ) -> np.ndarray:
        """The Fisher vector of one image from its projected patches sorted by region.

        Parameters
        ----------
        y : array_like of shape (n_patches, Dp)
            Projected patches, region r at rows ``bounds[r]:bounds[r + 1]``.
        bounds : array_like of int, shape (n_regions + 1,)
            Region offsets into `y`.
        y_moments : ndarray of float32, shape (n_patches, 2 * Dp), optional
            `moments(y)`, to share it between encoders of several dictionary sizes.

        Returns
        -------
        ndarray of float32, shape (n_features,)
            The R normalised blocks concatenated in region order.

        Raises
        ------
        ValueError
            If `bounds` does not have ``n_regions + 1`` entries.
        """
        gmm = self.gmm
        k, d = gmm.means_.shape
        if len(bounds) != self.n_regions + 1:
            raise ValueError(f"expected {self.n_regions + 1} region bounds, got {len(bounds)}")
        if y_moments is None:
            y_moments = moments(y)
        out = np.zeros((self.n_regions, 2 * k * d), dtype=np.float32)
        if y_moments.shape[0] == 0:
            return out.ravel()
        resp = gmm.log_likelihoods(y_moments)
        _softmax_rows(resp, _POSTERIOR_EPS)
        mu = gmm.means_
        sigma = np.sqrt(gmm.variances_)
        active = (gmm.weights_ >= _PRIOR_EPS)[:, None]
        sqrt_w = np.sqrt(np.maximum(gmm.weights_, _PRIOR_EPS))[:, None]
        for r in range(self.n_regions):
            a, b = int(bounds[r]), int(bounds[r + 1])
            t = b - a
            if t == 0:
                continue
            g = resp[a:b]
            mass = g.sum(axis=0, dtype=np.float64)[:, None]
            sums = (g.T @ y_moments[a:b]).astype(np.float64)
            s1, s2 = sums[:, :d], sums[:, d:]
            u = (s1 - mu * mass) / (sigma * (t * sqrt_w))
            v = ((s2 - 2.0 * mu * s1 + mu**2 * mass) / gmm.variances_ - mass) / (
                t * math.sqrt(2.0) * sqrt_w
            )
            block = np.concatenate(
                [np.where(active, u, 0.0).ravel(), np.where(active, v, 0.0).ravel()]
            )
            block = np.sign(block) * np.sqrt(np.abs(block))
            block /= max(float(np.linalg.norm(block)), 1e-12)
            out[r] = block
        return out.ravel()
