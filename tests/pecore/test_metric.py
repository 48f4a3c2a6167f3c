import itertools

import numpy as np
import pytest
import scipy.linalg

from pecore.metric import CFML, pair_scatter


def _brute_scatter(X, y):
    same, diff, n_same, n_diff = 0.0, 0.0, 0, 0
    for i, j in itertools.permutations(range(len(X)), 2):
        outer = np.outer(X[i] - X[j], X[i] - X[j])
        if y[i] == y[j]:
            same, n_same = same + outer, n_same + 1
        else:
            diff, n_diff = diff + outer, n_diff + 1
    return same / n_same, diff / n_diff


def _data(n, f, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = rng.standard_normal((n, f)) * 0.3 + rng.standard_normal((3, f))[y]
    return X, y


def test_pair_scatter_closed_form_equals_all_ordered_pairs():
    X, y = _data(9, 4, 0)
    for got, want in zip(pair_scatter(X, y), _brute_scatter(X, y), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)
    with pytest.raises(ValueError):
        pair_scatter(X, np.zeros(9))


def test_pair_scatter_in_place_has_the_bits_of_the_plain_formula(monkeypatch):
    """The in-place pair_scatter (it spares the dual solve n×n arrays) must change no bit of
    M_S or M_D, and so of W, whose results are pinned: same operations, same order."""
    from pecore import metric

    rng = np.random.default_rng(4)
    Z = rng.standard_normal((300, 70))
    labels = rng.integers(0, 3, 300)
    n, total = len(Z), Z.sum(axis=0)
    all_pairs = 2.0 * n * (Z.T @ Z) - 2.0 * np.outer(total, total)
    same, n_same = np.zeros_like(all_pairs), 0
    for c in np.unique(labels):
        Zc = Z[labels == c]
        sc = Zc.sum(axis=0)
        same += 2.0 * len(Zc) * (Zc.T @ Zc) - 2.0 * np.outer(sc, sc)
        n_same += len(Zc) * (len(Zc) - 1)
    n_diff = n * (n - 1) - n_same
    # outer products subtracted in blocks of 256 rows, and of 9 (several blocks, one partial)
    for rows in (256, 9):
        monkeypatch.setattr(metric._subtract_twice_outer, "__defaults__", (rows,))
        m_same, m_diff = pair_scatter(Z, labels)
        assert np.array_equal(m_same, same / n_same)
        assert np.array_equal(m_diff, (all_pairs - same) / n_diff)


@pytest.mark.parametrize(("n", "f"), [(12, 30), (40, 6)])
def test_low_rank_reduction_equals_the_full_generalised_eigenproblem(n, f):
    X, y = _data(n, f, 1)
    lam = 1.5e-4
    m_same, m_diff = _brute_scatter(X, y)
    gammas, W = scipy.linalg.eigh(m_diff, m_same + lam * np.eye(f))
    order = np.argsort(gammas)[::-1]
    gammas, W = gammas[order], W[:, order]
    model = CFML(reg=lam, n_components=f).fit(X, y)
    m = model.components_.shape[1]
    keep = gammas > 1e-9 * gammas[0]
    assert m == keep.sum()
    np.testing.assert_allclose(model.eigenvalues_[:m], gammas[:m], rtol=1e-7)
    full = W[:, :m] * np.sqrt(gammas[:m])
    # columns agree up to sign (distinct eigenvalues on random data)
    signs = np.sign(np.sum(full * model.components_, axis=0))
    # columns span 1e-2..1e3, so compare each relative to its norm; the full problem's B has
    # F - rank eigenvalues equal to λ, which limits its own eigenvector accuracy to ~1e-6
    scale = np.linalg.norm(full, axis=0)
    np.testing.assert_allclose(model.components_ * signs / scale, full / scale, atol=1e-5)
    # B-normalised eigenvectors: wᵀ B w = γ after the √γ scaling
    B = m_same + lam * np.eye(f)
    np.testing.assert_allclose(
        np.einsum("fi,fg,gi->i", model.components_, B, model.components_), gammas[:m], rtol=1e-7
    )


def test_transform_keeps_leading_dimensions_and_separates_classes():
    X, y = _data(60, 50, 2)
    model = CFML(n_components=2).fit(X, y)
    Z = model.transform(X)
    assert Z.shape == (60, 2) and Z.dtype == np.float64
    np.testing.assert_allclose(model.transform(X, 1), Z[:, :1])
    centroids = np.stack([Z[y == c].mean(axis=0) for c in range(3)])
    spread = max(Z[y == c].std(axis=0).max() for c in range(3))
    gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(centroids, 2)]
    assert min(gaps) > 3 * spread


def test_float32_features_give_the_float64_metric():
    # Fisher vectors are float32: the centred copy and the Gram product stay in float32
    X, y = _data(80, 400, 3)
    exact = CFML(n_components=2).fit(X, y)
    fast = CFML(n_components=2).fit(X.astype(np.float32), y)
    np.testing.assert_allclose(fast.eigenvalues_, exact.eigenvalues_, rtol=1e-3)
    signs = np.sign(np.sum(fast.components_ * exact.components_, axis=0))
    np.testing.assert_allclose(
        fast.transform(X) * signs,
        exact.transform(X),
        rtol=1e-3,
        atol=1e-3 * np.abs(exact.transform(X)).max(),
    )


def test_copy_false_centres_in_place_and_gives_the_same_metric():
    X, y = _data(30, 20, 4)
    X = X.astype(np.float32)
    kept = X.copy()
    a = CFML(n_components=2).fit(X, y)
    np.testing.assert_array_equal(X, kept)  # the default never touches the caller's array
    b = CFML(n_components=2, copy=False).fit(X, y)
    np.testing.assert_allclose(X.mean(axis=0), 0, atol=1e-6)  # centred in place
    np.testing.assert_array_equal(a.components_, b.components_)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fit_path_gives_each_lambda_the_metric_fit_gives_it(dtype):
    X, y = _data(40, 25, 5)
    X = X.astype(dtype)
    regs = [1.5e-4, 1e-2, 10.0]
    path = CFML(n_components=3, copy=False).fit_path(X.copy(), y, regs)
    assert [m.reg for m in path] == regs
    for metric, reg in zip(path, regs, strict=True):
        alone = CFML(n_components=3, reg=reg).fit(X, y)
        # the same operations in the same order: bit for bit, not just close
        np.testing.assert_array_equal(metric.components_, alone.components_)
        np.testing.assert_array_equal(metric.eigenvalues_, alone.eigenvalues_)
        assert metric.rank_ == alone.rank_
    # λ matters: a heavy ridge gives another metric
    assert not np.allclose(path[0].components_, path[-1].components_)


def test_fit_path_needs_a_lambda_and_checks_its_input_like_fit():
    X, y = _data(12, 5, 6)
    with pytest.raises(ValueError, match="at least one"):
        CFML().fit_path(X, y, [])
    with pytest.raises(ValueError, match="do not match"):
        CFML().fit_path(X, y[:-1], [1.0])


def test_large_symmetric_products_and_solves_run_blas_on_one_thread():
    """OpenBLAS's threaded syrk crashed near side 16 000 here: from 12 000 on, one thread."""
    from threadpoolctl import threadpool_info

    from pecore.metric import _ONE_THREAD_FROM, _blas_threads

    def blas_threads() -> set[int]:
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    before = blas_threads()
    with _blas_threads(_ONE_THREAD_FROM - 1):
        assert blas_threads() == before
    with _blas_threads(_ONE_THREAD_FROM):
        assert blas_threads() == {1}
    assert blas_threads() == before
