"""Checks on the real figshare file (skipped where ../shared/data is absent)."""

import numpy as np
import pytest

from pecore.datasets import default_data_path, load_figshare
from pecore.roi import dilate_mask

pytestmark = pytest.mark.dataset

if not default_data_path().is_file():
    pytest.skip(f"dataset not found at {default_data_path()}", allow_module_level=True)


def test_counts_folds_and_patient_disjoint_split():
    data = load_figshare()  # raises if a patient spans two folds
    assert len(data) == 3064 and data.images.shape == (3064, 512, 512)
    assert data.images.dtype == np.uint8 and data.masks.dtype == bool
    np.testing.assert_array_equal(np.bincount(data.labels)[1:], [708, 1426, 930])
    np.testing.assert_array_equal(np.bincount(data.folds)[1:], [570, 655, 562, 613, 664])
    assert np.unique(data.pids).size == 233
    np.testing.assert_array_equal(data.index, np.arange(1, 3065))


def test_roi_patches_never_leave_the_image():
    data = load_figshare(limit=400)
    for mask in data.masks:
        rows, cols = np.nonzero(dilate_mask(mask, 24))
        assert rows.min() >= 4 and cols.min() >= 4 and rows.max() < 508 and cols.max() < 508
