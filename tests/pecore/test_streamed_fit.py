"""Training without holding every Fisher vector or image at once equals the in-memory fit.

Tolerance: the streamed Gram and W are float32 block products summed in another order than
one BLAS call, so W and γ agree to 1e-5 relative (of their largest magnitude); the patch model
is the same code on the same sample and must be identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from pecore.datasets import make_synthetic
from pecore.metric import CFML
from pecore.pipeline import CBIRPipeline, fit_patch_model

RTOL = 1e-5


class LazyStack(Sequence[np.ndarray]):
    """Items produced on indexing (a store read stands in); counts reads, holds nothing."""

    def __init__(self, source: np.ndarray) -> None:
        self.source = source
        self.reads = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):  # type: ignore[override]
        self.reads += 1
        return np.array(self.source[i])


def _close(a: np.ndarray, b: np.ndarray, rtol: float = RTOL) -> bool:
    return float(np.abs(a - b).max()) <= rtol * float(np.abs(a).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cfml_from_chunks_equals_cfml_in_memory(dtype):
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2], [30, 45, 25])
    X = (rng.standard_normal((100, 400)) + 2.0 * np.eye(400)[labels * 7]).astype(dtype)
    whole = CFML(n_components=4).fit(X, labels)
    for cuts in ([100], [37, 63], [1, 50, 49], [10] * 10):
        chunks = np.split(X, np.cumsum(cuts)[:-1])
        streamed = CFML(n_components=4).fit_chunks(chunks, labels)
        assert streamed.rank_ == whole.rank_
        assert _close(whole.eigenvalues_, streamed.eigenvalues_)
        assert _same_up_to_sign(whole.components_, streamed.components_, RTOL)
    with pytest.raises(ValueError, match="labels"):
        CFML().fit_chunks([X[:10]], labels)


def test_cfml_from_chunks_on_a_torch_device():
    pytest.importorskip("torch", reason="the [gpu] extra (torch) is not installed")
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1], 40)
    X = (rng.standard_normal((80, 200)) + np.eye(200)[labels]).astype(np.float32)
    whole = CFML(n_components=3).fit(X, labels)
    streamed = CFML(n_components=3).fit_chunks([X[:33], X[33:]], labels, device="cpu")
    assert _same_up_to_sign(whole.components_, streamed.components_, RTOL)


def _same_up_to_sign(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    signs = np.sign(np.sum(a * b, axis=0))
    return _close(a, b * signs, rtol)


def _ranked_data(n: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    X = rng.standard_normal((n, features)) + 1.5 * np.eye(features)[labels * 5]
    return X, labels


def test_rank_capped_fit_is_exact_where_the_cap_spans_the_data():
    # 200 samples in 50 dimensions: rank 50 ≤ max_rank, so the randomised basis spans the
    # data and the subspace solve must give the exact metric (W up to each column's sign)
    X, labels = _ranked_data(200, 50, seed=6)
    whole = CFML(n_components=4).fit(X, labels)
    capped = CFML(n_components=4, max_rank=60).fit_chunks(np.split(X, [70, 150]), labels)
    assert capped.rank_ == whole.rank_ == 50
    assert _close(whole.eigenvalues_, capped.eigenvalues_, 1e-8)
    assert _same_up_to_sign(whole.components_, capped.components_, 1e-7)


def test_rank_capped_fit_below_the_data_rank_is_bounded_by_the_exact_one():
    # in a k-dimensional subspace the generalised eigenvalues interlace: none can exceed the
    # exact fit's (Cauchy); the capped W still projects onto n_components dimensions
    X, labels = _ranked_data(300, 120, seed=7)
    whole = CFML(n_components=5).fit(X, labels)
    capped = CFML(n_components=5, max_rank=40).fit_chunks([X[:100], X[100:]], labels)
    assert capped.rank_ == 40 and capped.components_.shape == (120, 5)
    assert np.all(capped.eigenvalues_ <= whole.eigenvalues_ * (1 + 1e-9))
    assert capped.eigenvalues_[0] > 0.5 * whole.eigenvalues_[0]  # the class directions survive


def test_rank_capped_fit_on_a_torch_device_equals_numpy():
    pytest.importorskip("torch", reason="the [gpu] extra (torch) is not installed")
    X, labels = _ranked_data(200, 50, seed=8)
    X = X.astype(np.float32)
    numpy_fit = CFML(n_components=3, max_rank=60).fit_chunks([X[:90], X[90:]], labels)
    torch_fit = CFML(n_components=3, max_rank=60).fit_chunks([X[:90], X[90:]], labels, device="cpu")
    assert _same_up_to_sign(numpy_fit.components_, torch_fit.components_, 1e-4)


@pytest.mark.parametrize("n, features", [(200, 50), (60, 90)])
def test_primal_fit_from_streamed_statistics_equals_the_exact_fit(n, features):
    # n > F (the consortium case) and n < F (directions outside the data's span get γ = 0)
    X, labels = _ranked_data(n, features, seed=9)
    whole = CFML(n_components=4).fit(X, labels)
    chunks = LazyStack(np.stack(np.split(X, 4)))
    primal = CFML(n_components=4, solver="primal").fit_chunks(chunks, labels)
    # shapes, the first chunk's dtype, the mean, the statistics: each chunk read 3 times + 1
    assert primal.rank_ == features and chunks.reads == 4 + 1 + 4 + 4
    assert _close(whole.eigenvalues_, primal.eigenvalues_, 1e-8)
    assert _same_up_to_sign(whole.components_, primal.components_, 1e-6)
    with pytest.raises(ValueError, match="solver"):
        CFML(solver="gram").fit_chunks([X], labels)
    with pytest.raises(ValueError, match="two classes"):
        CFML(solver="primal").fit_chunks([X], np.arange(n))


def test_primal_fit_on_a_torch_device_equals_numpy():
    pytest.importorskip("torch", reason="the [gpu] extra (torch) is not installed")
    X, labels = _ranked_data(300, 60, seed=10)
    numpy_fit = CFML(n_components=3, solver="primal").fit_chunks(np.split(X, 3), labels)
    torch_fit = CFML(n_components=3, solver="primal").fit_chunks(
        np.split(X, 3), labels, device="cpu"
    )
    assert _close(numpy_fit.eigenvalues_, torch_fit.eigenvalues_, 1e-5)
    assert _same_up_to_sign(numpy_fit.components_, torch_fit.components_, 1e-4)
    # float32 statistics and LOBPCG (the GPU's precision) on the two class directions; the
    # third γ lies in a cluster equal to 6 digits, where any vector of the cluster solves it
    chunks32 = np.split(X.astype(np.float32), 3)
    torch32 = CFML(n_components=2, solver="primal").fit_chunks(chunks32, labels, device="cpu")
    assert _close(numpy_fit.eigenvalues_[:2], torch32.eigenvalues_, 1e-5)
    assert _same_up_to_sign(numpy_fit.components_[:, :2], torch32.components_, 1e-3)
    # the capped LOBPCG reports how far its pairs got; the direct solver has nothing to report
    assert numpy_fit.eigen_residuals_ is None
    assert torch_fit.eigen_residuals_.shape == torch_fit.eigenvalues_.shape
    assert float(torch_fit.eigen_residuals_.max()) < 1e-6
    assert float(torch32.eigen_residuals_.max()) < 1e-3


def test_float32_primal_fit_on_a_torch_device_below_f_templates_multiplies_in_float64():
    """With n − classes < F, M_S + λI equals λ where M_S does not reach; float32 LOBPCG there
    returns a spurious third pair (γ ≈ 10⁴ where the exact one is 0.985) although the float32
    statistics are accurate, so their products are taken in float64: every pair matches."""
    pytest.importorskip("torch", reason="the [gpu] extra (torch) is not installed")
    rng = np.random.default_rng(0)
    labels = np.arange(100) % 3  # 100 − 3 classes < 200 features
    X = rng.standard_normal((100, 200), dtype=np.float32)
    X += 0.3 * rng.standard_normal((3, 200)).astype(np.float32)[labels]
    exact = CFML(n_components=4).fit(X.astype(np.float64), labels)
    fit = CFML(n_components=4, solver="primal", max_iter=150)
    fit.fit_chunks(np.split(X, 2), labels, device="cpu")
    np.testing.assert_allclose(fit.eigenvalues_, exact.eigenvalues_, rtol=1e-3)
    assert _same_up_to_sign(exact.components_[:, :2], fit.components_[:, :2], 1e-2)


def test_primal_fit_on_a_torch_device_returns_when_the_spectrum_clusters():
    """Ten wanted pairs, eight of them in a cluster float32 cannot resolve: the iteration cap
    ends the solve (an uncapped LOBPCG need not return), a ConvergenceWarning and the
    residuals say so."""
    pytest.importorskip("torch", reason="the [gpu] extra (torch) is not installed")
    rng = np.random.default_rng(3)
    labels = np.arange(600) % 3
    X = rng.standard_normal((600, 200)).astype(np.float32)
    X += 0.3 * rng.standard_normal((3, 200)).astype(np.float32)[labels]
    fit = CFML(n_components=10, solver="primal", max_iter=5)
    with pytest.warns(ConvergenceWarning, match="in 5 iterations"):
        fit.fit_chunks(np.split(X, 3), labels, device="cpu")
    assert fit.eigen_residuals_.shape == fit.eigenvalues_.shape
    assert np.all(np.isfinite(fit.eigen_residuals_)) and fit.eigenvalues_[0] > 1.0


def test_patch_model_from_lazy_sequences_is_identical():
    data = make_synthetic(n_images=24, size=48, seed=2)
    images, masks = LazyStack(data.images), LazyStack(data.masks)
    lazy = fit_patch_model(images, masks, [3], radius=3, n_train_patches=5_000, random_state=1)
    whole = fit_patch_model(
        list(data.images), list(data.masks), [3], radius=3, n_train_patches=5_000, random_state=1
    )
    assert images.reads <= len(data.images) and masks.reads <= 2 * len(data.masks)
    np.testing.assert_array_equal(lazy.pca.components_, whole.pca.components_)
    np.testing.assert_array_equal(lazy.gmms[3].means_, whole.gmms[3].means_)
    np.testing.assert_array_equal(lazy.gmms[3].variances_, whole.gmms[3].variances_)


def test_pipeline_fit_streamed_equals_fit(tmp_path):
    data = make_synthetic(n_images=45, size=48, seed=6)
    params = dict(n_components=3, radius=3, n_train_patches=8_000, dim=3, n_jobs=1)
    whole = CBIRPipeline(**params).fit(data.images, data.masks, data.labels)
    streamed = CBIRPipeline(**params).fit_streamed(
        LazyStack(data.images),
        LazyStack(data.masks),
        data.labels,
        chunk_size=8,
        spill_dir=tmp_path,
    )
    assert list(tmp_path.iterdir()) == []  # the spilled chunks are gone
    np.testing.assert_array_equal(streamed.gmm_.means_, whole.gmm_.means_)
    assert _close(whole.metric_.eigenvalues_, streamed.metric_.eigenvalues_)
    # an eigenvector's sign is arbitrary: the two fits' rounding may pick either (CI did)
    assert _same_up_to_sign(whole.metric_.components_, streamed.metric_.components_, RTOL)
    signs = np.sign(np.sum(whole.metric_.components_ * streamed.metric_.components_, axis=0))
    z, s = whole.transform(data.images, data.masks), streamed.transform(data.images, data.masks)
    assert _close(z, s * signs.astype(np.float32), 1e-4)
    # the primal solver (2·F² floats whatever n is) fits the same metric
    primal = CBIRPipeline(**params).fit_streamed(
        data.images, data.masks, data.labels, chunk_size=8, metric_solver="primal"
    )
    assert _close(whole.metric_.eigenvalues_, primal.metric_.eigenvalues_, 1e-4)
    assert _same_up_to_sign(whole.metric_.components_, primal.metric_.components_, 1e-3)
    with pytest.raises(ValueError, match="solver"):
        CBIRPipeline(**params).fit_streamed(
            data.images, data.masks, data.labels, metric_solver="gram"
        )
    with pytest.raises(ValueError, match="chunk_size"):
        CBIRPipeline(**params).fit_streamed(data.images, data.masks, data.labels, chunk_size=0)
