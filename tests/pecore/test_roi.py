import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import disk

from pecore.roi import dilate_mask, hazen_quantiles, intensity_regions


@pytest.mark.parametrize("radius", [0, 1, 3, 7])
def test_dilation_equals_disk_structuring_element(radius):
    rng = np.random.default_rng(radius)
    mask = np.zeros((40, 50), dtype=bool)
    mask[rng.integers(0, 40, 6), rng.integers(0, 50, 6)] = True
    mask[18:22, 20:27] = True
    expected = ndimage.binary_dilation(mask, structure=disk(radius)) if radius else mask
    np.testing.assert_array_equal(dilate_mask(mask, radius), expected)


def test_dilation_disk_is_euclidean_and_closed():
    mask = np.zeros((31, 31), dtype=bool)
    mask[15, 15] = True
    out = dilate_mask(mask, 5)
    yy, xx = np.mgrid[-15:16, -15:16]
    np.testing.assert_array_equal(out, yy**2 + xx**2 <= 25)  # (3, 4) is on the disk
    assert out[15, 20] and out[18, 19] and not out[19, 19]


def test_dilation_of_empty_mask_and_bad_input():
    assert not dilate_mask(np.zeros((5, 5), bool), 3).any()
    with pytest.raises(ValueError):
        dilate_mask(np.zeros(5, bool), 3)
    with pytest.raises(ValueError):
        dilate_mask(np.zeros((5, 5), bool), -1)


def test_hazen_quantiles_match_matlab_default():
    # MATLAB: quantile(1:5, [0 0.05 0.25 0.3 0.5 1]) = [1 1 1.75 2 3 5]
    q = hazen_quantiles(np.array([5, 3, 1, 2, 4]), np.array([0, 0.05, 0.25, 0.3, 0.5, 1.0]))
    np.testing.assert_allclose(q, [1, 1, 1.75, 2, 3, 5])


def test_regions_split_at_quantiles():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    # cuts: min 1, median 2.5, max 4
    np.testing.assert_array_equal(intensity_regions(values, 2), [0, 0, 1, 1])
    np.testing.assert_array_equal(intensity_regions(np.arange(8.0), 4), [0, 0, 1, 1, 2, 2, 3, 3])


def test_value_on_a_cut_goes_to_the_higher_region_and_ties_empty_regions():
    # median of [1, 1, 1, 2] is 1 = t_0 = t_1: every 1 lands in region 1, region 0 is empty
    np.testing.assert_array_equal(intensity_regions(np.array([1.0, 1, 1, 2]), 2), [1, 1, 1, 1])
    # a constant ROI: all pixels in the top region
    np.testing.assert_array_equal(intensity_regions(np.full(5, 0.3), 8), [7] * 5)
    # cuts of 0..3 at 4 regions (hazen): 0, 0.5, 1.5, 2.5, 3
    regions = intensity_regions(np.array([0.0, 1, 2, 3]), 4)
    np.testing.assert_array_equal(regions, [0, 1, 2, 3])


def test_regions_equal_matlab_overwrite_loop():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 12, 200) / 11.0  # many ties
    cuts = np.quantile(values, np.linspace(0, 1, 9), method="hazen")
    looped = np.zeros(values.size, dtype=int)
    for j in range(1, 9):  # MATLAB: later regions overwrite earlier ones
        looped[(values >= cuts[j - 1]) & (values <= cuts[j])] = j - 1
    np.testing.assert_array_equal(intensity_regions(values, 8), looped)
