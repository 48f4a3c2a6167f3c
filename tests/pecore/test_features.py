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


def _tile_reflected_reference(image, rows, cols, size, tile):
    """One patch at a time: the centre's own tile, np.pad(..., mode="reflect"), one window."""
    half, out = size // 2, []
    for r, c in zip(rows, cols, strict=True):
        r0, c0 = r - r % tile, c - c % tile
        padded = np.pad(image[r0 : r0 + tile, c0 : c0 + tile], half, mode="reflect")
        out.append(padded[r % tile : r % tile + size, c % tile : c % tile + size].ravel())
    return np.array(out)


@pytest.mark.parametrize(("size", "tile"), [(9, 16), (3, 4), (5, 8)])
def test_tile_reflected_patches_equal_the_per_tile_reference(size, tile):
    rng = np.random.default_rng(size)
    image = rng.random((4 * tile, 3 * tile)).astype(np.float32)
    rows, cols = np.nonzero(rng.random(image.shape) < 0.3)
    got = extract_patches(image, rows, cols, size, tile=tile)
    np.testing.assert_array_equal(got, _tile_reflected_reference(image, rows, cols, size, tile))
    assert got.dtype == np.float32 and got.shape == (rows.size, size * size)
    # a patch that lies inside its tile is the plain one; one that straddles is not
    half, local_r, local_c = size // 2, rows % tile, cols % tile
    inside = (
        (local_r >= half) & (local_r < tile - half) & (local_c >= half) & (local_c < tile - half)
    )
    assert inside.any() and (~inside).any()
    plain = extract_patches(image, rows, cols, size)
    np.testing.assert_array_equal(got[inside], plain[inside])
    # (at the image's own border plain patches reflect too: only the grid's inner borders differ)
    height, width = image.shape
    inner = (
        ((local_r < half) & (rows >= tile))
        | ((local_r >= tile - half) & (rows < height - tile))
        | ((local_c < half) & (cols >= tile))
        | ((local_c >= tile - half) & (cols < width - tile))
    )
    assert inner.any()
    assert not (got[inner] == plain[inner]).all(axis=1).any()
    np.testing.assert_array_equal(got[~inner], plain[~inner])


def test_tile_reflected_patches_hold_only_their_own_tiles_pixels():
    tile, size = 16, 9
    image = np.arange(64 * 64, dtype=np.int64).reshape(64, 64)  # every pixel names its place
    rows, cols = np.nonzero(np.ones_like(image, dtype=bool))
    patches = extract_patches(image, rows, cols, size, tile=tile)
    tile_of = (patches // 64 // tile) * 4 + (patches % 64) // tile
    centre = ((rows // tile) * 4 + cols // tile)[:, None]
    assert (tile_of == centre).all()
    # the plain patches of the border positions read other tiles: the test can tell
    plain = extract_patches(image, rows, cols, size)
    assert ((plain // 64 // tile) * 4 + (plain % 64) // tile != centre).any()


def test_a_neighbouring_tile_does_not_change_tile_reflected_features():
    rng = np.random.default_rng(3)
    image = rng.integers(1, 255, (64, 64)).astype(np.uint8)
    image[0, 0], image[0, 1] = 0, 255  # fixes the min-max normalisation
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:32, 16:32] = True  # exactly one tile: every border patch would leave it
    other = image.copy()
    other[16:32, 32:48] = rng.permutation(other[16:32, 32:48].ravel()).reshape(16, 16)
    other[32:48, 16:48] = 255 - other[32:48, 16:48]
    same = [roi_patches(x, mask, radius=0, n_regions=4, patch_tile=16) for x in (image, other)]
    np.testing.assert_array_equal(same[0].patches, same[1].patches)
    np.testing.assert_array_equal(same[0].bounds, same[1].bounds)
    plain = [roi_patches(x, mask, radius=0, n_regions=4) for x in (image, other)]
    assert not np.array_equal(plain[0].patches, plain[1].patches)


def test_tile_reflection_commutes_with_the_tiles_dihedral_transforms():
    """The cloud's tile-reflected patch of a rotated/transposed tile is the owner's patch of
    the plain tile, moved the same way: reflection and the dihedral group commute."""
    rng = np.random.default_rng(4)
    tile = rng.random((16, 16)).astype(np.float32)
    rows, cols = np.nonzero(np.ones((16, 16), dtype=bool))
    plain = extract_patches(tile, rows, cols, 9, tile=16).reshape(-1, 9, 9)
    for moved, where, move in (
        (np.rot90(tile), (15 - cols, rows), np.rot90),
        (tile.T, (cols, rows), np.transpose),
    ):
        got = extract_patches(np.ascontiguousarray(moved), *where, 9, tile=16).reshape(-1, 9, 9)
        np.testing.assert_array_equal(got, np.array([move(p) for p in plain]))


def test_tile_reflected_patches_refuse_tiles_that_do_not_fit():
    image = np.zeros((32, 32), dtype=np.float32)
    rows = cols = np.array([5])
    with pytest.raises(ValueError, match="does not divide"):
        extract_patches(image, rows, cols, 3, tile=12)
    with pytest.raises(ValueError, match="cannot be reflected"):
        extract_patches(image, rows, cols, 9, tile=4)
