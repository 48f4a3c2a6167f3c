import numpy as np
import pytest

from pecore.features import (
    PatchPCA,
    extract_patches,
    minmax_normalise,
    roi_patches,
    training_sample,
)


def test_minmax_normalise_whole_image_float32():
    image = np.array([[10, 20], [30, 50]], dtype=np.uint8)
    out = minmax_normalise(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(minmax_normalise(np.full((3, 3), 7)), np.zeros((3, 3)))


def test_patches_are_row_major_blocks_centred_on_pixels():
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    rows, cols = np.array([4, 5]), np.array([4, 6])
    patches = extract_patches(image, rows, cols, 3)
    np.testing.assert_array_equal(patches[0], image[3:6, 3:6].ravel())
    np.testing.assert_array_equal(patches[1], image[4:7, 5:8].ravel())


def test_patches_near_the_border_use_reflect_padding():
    image = np.arange(25, dtype=np.float32).reshape(5, 5)
    patch = extract_patches(image, np.array([0]), np.array([0]), 3).reshape(3, 3)
    np.testing.assert_array_equal(patch, np.pad(image, 1, mode="reflect")[0:3, 0:3])
    with pytest.raises(ValueError):
        extract_patches(image, np.array([2]), np.array([2]), 4)


def test_roi_patches_sorted_by_region_with_bounds():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[12:20, 10:22] = True
    result = roi_patches(image, mask, patch_size=5, radius=2, n_regions=4)
    roi_size = np.count_nonzero(
        __import__("pecore.roi", fromlist=["dilate_mask"]).dilate_mask(mask, 2)
    )
    assert result.patches.shape == (roi_size, 25)
    assert result.bounds[0] == 0 and result.bounds[-1] == roi_size
    centres = result.patches[:, 12]  # centre pixel of a 5×5 patch
    for r in range(3):  # each region's centre values lie below the next region's
        lo, mid, hi = result.bounds[r], result.bounds[r + 1], result.bounds[r + 2]
        if mid > lo and hi > mid:
            assert centres[lo:mid].max() <= centres[mid:hi].min()


def test_training_sample_takes_a_fifth_per_image_then_caps_the_pool():
    rng = np.random.default_rng(0)
    counts = [12, 100, 0, 7]  # round(m/5) = 2, 20, 0, 1 (MATLAB rounding)
    picked = training_sample(counts, n_samples=10_000, rng=rng)
    assert [p.size for p in picked] == [2, 20, 0, 1]
    for p, m in zip(picked, counts, strict=True):
        assert np.all((p >= 0) & (p < max(m, 1))) and np.unique(p).size == p.size
    capped = training_sample([1000, 1000, 1000], n_samples=150, rng=np.random.default_rng(1))
    assert sum(p.size for p in capped) == 150
    assert all(p.size > 20 for p in capped)  # uniform over the pool, not one image


def test_pca_keeps_fewest_components_reaching_the_energy():
    rng = np.random.default_rng(0)
    scales = np.array([10.0, 5.0, 1.0, 0.1, 0.01])
    basis, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    X = (rng.standard_normal((20_000, 5)) * scales) @ basis.T + 3.0
    variances = scales**2 / (scales**2).sum()  # ≈ [.794, .198, .0079, ...]
    assert PatchPCA(energy=0.99).fit(X).n_components_ == 2
    assert PatchPCA(energy=0.999).fit(X).n_components_ == 3
    pca = PatchPCA(energy=0.99995).fit(X)
    assert pca.n_components_ == 4
    np.testing.assert_allclose(pca.explained_variance_ratio_, variances[:4], rtol=0.05)
    y = pca.transform(X)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=0.05)
    np.testing.assert_allclose(y.var(axis=0), scales[:4] ** 2, rtol=0.05)
