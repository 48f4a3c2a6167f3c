import math

import numpy as np
import pytest

from pecore.fisher import DiagonalGMM, FisherVectorEncoder


def _gmm(k=3, d=2, seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 1.5, k)
    return DiagonalGMM.from_state(
        {
            "weights": weights / weights.sum(),
            "means": rng.standard_normal((k, d)),
            "variances": rng.uniform(0.3, 2.0, (k, d)),
        }
    )


def _reference_block(y, gmm):
    """Improved FV of one descriptor set, straight from the formulas (float64 loops)."""
    k, d = gmm.means_.shape
    log_p = np.array(
        [
            [
                math.log(gmm.weights_[c])
                - 0.5
                * sum(
                    math.log(2 * math.pi * gmm.variances_[c, j])
                    + (yt[j] - gmm.means_[c, j]) ** 2 / gmm.variances_[c, j]
                    for j in range(d)
                )
                for c in range(k)
            ]
            for yt in y
        ]
    )
    post = np.exp(log_p - log_p.max(axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    t = len(y)
    u = np.zeros((k, d))
    v = np.zeros((k, d))
    for c in range(k):
        z = (y - gmm.means_[c]) / np.sqrt(gmm.variances_[c])
        u[c] = (post[:, c, None] * z).sum(axis=0) / (t * math.sqrt(gmm.weights_[c]))
        v[c] = (post[:, c, None] * (z**2 - 1)).sum(axis=0) / (t * math.sqrt(2 * gmm.weights_[c]))
    block = np.concatenate([u.ravel(), v.ravel()])  # [u_1..u_K, v_1..v_K]
    block = np.sign(block) * np.sqrt(np.abs(block))
    return block / np.linalg.norm(block)


def test_fisher_vector_matches_formulas_layout_and_normalisation():
    gmm = _gmm()
    rng = np.random.default_rng(1)
    y = rng.standard_normal((13, 2)).astype(np.float32)
    bounds = np.array([0, 5, 5, 13])  # region 1 is empty
    fv = FisherVectorEncoder(gmm, n_regions=3).encode(y, bounds)
    assert fv.dtype == np.float32 and fv.shape == (3 * 2 * 3 * 2,)
    blocks = fv.reshape(3, -1)
    np.testing.assert_allclose(blocks[0], _reference_block(y[:5].astype(float), gmm), atol=2e-5)
    np.testing.assert_array_equal(blocks[1], 0)
    np.testing.assert_allclose(blocks[2], _reference_block(y[5:].astype(float), gmm), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=1), [1, 0, 1], atol=1e-6)


def test_fisher_vector_of_an_image_without_patches_is_zero():
    fv = FisherVectorEncoder(_gmm(), n_regions=2).encode(
        np.zeros((0, 2), np.float32), np.zeros(3, int)
    )
    assert fv.shape == (2 * 2 * 3 * 2,) and not fv.any()
    with pytest.raises(ValueError):
        FisherVectorEncoder(_gmm(), n_regions=2).encode(
            np.zeros((4, 2), np.float32), np.array([0, 4])
        )


def test_gmm_recovers_separated_clusters_and_clamps_variances():
    rng = np.random.default_rng(0)
    centres = np.array([[-4.0, -4.0, 1.0], [4.0, 4.0, 1.0]])
    X = np.concatenate([c + 0.5 * rng.standard_normal((3000, 3)) for c in centres])
    X[:, 2] = 1.0  # a constant dimension: variance must be floored at 1e-4, not 0
    gmm = DiagonalGMM(n_components=2, random_state=0).fit(X)
    order = np.argsort(gmm.means_[:, 0])
    np.testing.assert_allclose(gmm.means_[order, :2], centres[:, :2], atol=0.05)
    np.testing.assert_allclose(gmm.weights_, [0.5, 0.5], atol=0.01)
    np.testing.assert_allclose(gmm.variances_[:, :2], 0.25, rtol=0.1)
    np.testing.assert_allclose(gmm.variances_[:, 2], 1e-4)
    assert gmm.converged_ and gmm.n_iter_ < 100
    proba = gmm.predict_proba(X[:5])
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)


def test_gmm_is_deterministic_for_a_seed_and_caps_iterations():
    X = np.random.default_rng(3).standard_normal((2000, 4))
    a = DiagonalGMM(n_components=5, max_iter=7, random_state=11).fit(X)
    b = DiagonalGMM(n_components=5, max_iter=7, random_state=11).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    assert a.n_iter_ <= 7
    with pytest.raises(ValueError):
        DiagonalGMM(n_components=10).fit(X[:5])


def test_softmax_kernel_matches_numpy_and_zeroes_small_posteriors():
    from pecore.fisher import _softmax_rows

    rng = np.random.default_rng(4)
    log_lik = (rng.standard_normal((50, 7)) * 6).astype(np.float32)
    log_lik[3, 2] = -np.inf  # a skipped component (prior below 1e-6)
    want = np.exp(log_lik - log_lik.max(axis=1, keepdims=True))
    lse = np.log(want.sum(axis=1)) + log_lik.max(axis=1)
    want /= want.sum(axis=1, keepdims=True)
    got = log_lik.copy()
    np.testing.assert_allclose(_softmax_rows(got, 1e-3), lse, rtol=1e-6)
    np.testing.assert_allclose(got, np.where(want >= 1e-3, want, 0), rtol=1e-5, atol=1e-7)
    assert got[3, 2] == 0 and (got[want < 1e-3] == 0).all()


def test_kmeans_plusplus_seeds_distinct_data_points_spread_over_clusters():
    from pecore.fisher import _kmeans_plusplus

    rng = np.random.default_rng(5)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    X = np.concatenate([c + rng.standard_normal((500, 2)) for c in centres]).astype(np.float32)
    seeds = _kmeans_plusplus(X, 4, np.random.default_rng(0))
    # every seed is a data point, and D² sampling puts one in each far-apart cluster
    assert all((np.abs(X - s).sum(axis=1) == 0).any() for s in seeds)
    nearest = np.argmin(((seeds[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
    assert sorted(nearest) == [0, 1, 2, 3]
    # fewer distinct points than seeds: no division by zero, still k seeds
    assert _kmeans_plusplus(np.zeros((10, 2), np.float32), 3, np.random.default_rng(0)).shape == (
        3,
        2,
    )


def test_gmm_fit_does_not_depend_on_the_number_of_threads():
    X = np.random.default_rng(6).standard_normal((20000, 3)).astype(np.float32)
    one = DiagonalGMM(n_components=4, max_iter=15, random_state=2, n_jobs=1).fit(X)
    two = DiagonalGMM(n_components=4, max_iter=15, random_state=2, n_jobs=2).fit(X)
    np.testing.assert_array_equal(one.means_, two.means_)
    np.testing.assert_array_equal(one.variances_, two.variances_)


def test_gmm_restarts_a_component_that_holds_only_an_outlier():
    # D² seeding all but surely puts a centre on the far outlier; that component then holds one
    # point, below VLFeat's 1e-2·n/K, and is restarted by splitting the heaviest one
    rng = np.random.default_rng(7)
    X = np.concatenate([rng.standard_normal((2000, 2)), [[1e4, 1e4]]]).astype(np.float32)
    # tol=0: no early stop, so EM reaches the restart check (from the third iteration on)
    gmm = DiagonalGMM(n_components=3, max_iter=20, tol=0.0, random_state=0).fit(X)
    assert gmm.n_restarts_ >= 1
    assert np.isfinite(gmm.means_).all() and np.isfinite(gmm.variances_).all()
    np.testing.assert_allclose(gmm.weights_.sum(), 1.0)
    assert (gmm.weights_ > 0.05).all()  # the restarted component took real data
