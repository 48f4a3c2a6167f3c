"""Feature-inversion and membership attacks on sealed Fisher vectors, on small generated data."""

from __future__ import annotations

import numpy as np
import pytest

from pecore.datasets import make_synthetic
from pecore.feature_attacks import (
    CROP_SIZE,
    NearestTemplateAttack,
    RidgeInversionAttack,
    SealedAttackSplit,
    membership_attack,
    roi_crop,
    score_reconstructions,
    sealed_attack_suite,
    slice_from_thumbnail,
    slice_thumbnail,
)


def test_roi_crop_is_the_dilated_masks_box_resampled():
    image = np.zeros((40, 40), dtype=np.uint8)
    image[10:20, 10:20] = 200
    mask = np.zeros((40, 40), dtype=bool)
    mask[12:18, 12:18] = True
    crop = roi_crop(image, mask, radius=2, size=16)
    assert crop.shape == (16, 16) and crop.dtype == np.float32
    assert crop.min() > 150  # the box (10..19) holds only the bright square
    with pytest.raises(ValueError, match="empty"):
        roi_crop(image, np.zeros_like(mask), radius=2)
    thumb = slice_thumbnail(image, 20)
    back = slice_from_thumbnail(thumb, (40, 40))
    assert back.dtype == np.uint8 and back.shape == (40, 40) and back[15, 15] > 150


def test_nearest_template_returns_the_nearest_targets_and_their_mean():
    public = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]], dtype=np.float32)
    targets = np.array([[10.0], [20.0], [30.0]])
    one = NearestTemplateAttack().fit(public, targets)
    np.testing.assert_array_equal(one.predict([[0.9, 0.1], [0.1, 4.0]]), [[20.0], [30.0]])
    two = NearestTemplateAttack(n_neighbors=2).fit(public, targets)
    np.testing.assert_array_equal(two.predict([[0.9, 0.1]]), [[15.0]])
    with pytest.raises(ValueError, match="n_neighbors"):
        NearestTemplateAttack(n_neighbors=4).fit(public, targets)


def test_ridge_recovers_a_linear_map_and_picks_its_penalty_on_the_groups():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 200))
    true_map = rng.standard_normal((200, 6))
    y = x @ true_map
    groups = np.repeat([1, 2], 40)
    attack = RidgeInversionAttack(alphas=(1e-6, 1e3)).fit(x[:60], y[:60], groups[:60])
    assert attack.alpha_ == 1e-6  # the noiseless map wants (almost) no penalty
    assert attack.cv_mse_[1e-6] < attack.cv_mse_[1e3]
    predicted = attack.predict(x[60:])
    assert predicted.shape == (20, 6)
    # 60 samples of a 200-dim map: the prediction is the minimum-norm fit, far better than 0
    assert np.mean((predicted - y[60:]) ** 2) < 0.9 * np.mean(y[60:] ** 2)
    with pytest.raises(ValueError, match="two groups"):
        RidgeInversionAttack().fit(x, y, np.ones(80))


def test_scores_name_the_best_reconstruction_worst():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 255, (3, 32, 32)).astype(np.uint8)
    guesses = truth.copy()
    guesses[1:] = rng.integers(0, 255, (2, 32, 32))
    scores = score_reconstructions(truth[:, :CROP_SIZE], guesses, truth, guesses)
    assert scores["slice"]["ssim"]["worst"] == pytest.approx(1.0)  # one perfect copy
    assert scores["slice"]["ssim"]["median"] < 0.2 and scores["slice"]["ssim"]["n"] == 3


def test_membership_separates_members_whose_probes_lie_near_their_slices():
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((20, 8)) * 5
    stored = np.repeat(centres[:10], 3, axis=0) + 0.1 * rng.standard_normal((30, 8))
    stored_patients = np.repeat(np.arange(10), 3)
    members = centres[:10] + 0.1 * rng.standard_normal((10, 8))
    outsiders = centres[10:] + 0.1 * rng.standard_normal((10, 8))
    result = membership_attack(stored, stored_patients, members, np.arange(10), outsiders)
    assert result["auc"] == 1.0 and result["reidentification_top1"] == 1.0
    assert result["chance_top1"] == pytest.approx(0.1)
    unrelated = membership_attack(
        stored, stored_patients, rng.standard_normal((10, 8)) * 5, np.arange(10), outsiders
    )
    assert unrelated["auc"] < 0.8 and unrelated["reidentification_top1"] < 0.5


def test_split_roles_are_disjoint_and_hold_back_member_probes():
    data = make_synthetic(n_images=60, size=48, seed=5, images_per_patient=4)
    rows = SealedAttackSplit(probe_fraction=0.5).rows(
        data.folds, data.pids, np.random.default_rng(0)
    )
    assert not set(rows["stored"]) & set(rows["member_probes"])
    assert set(data.pids[rows["member_probes"]]) <= set(data.pids[rows["stored"]])
    assert not set(data.pids[rows["public"]]) & set(data.pids[rows["stored"]])
    assert not set(data.pids[rows["outsiders"]]) & set(data.pids[rows["public"]])
    with pytest.raises(ValueError, match="overlap"):
        SealedAttackSplit(public_folds=(4,)).rows(data.folds, data.pids, np.random.default_rng(0))


def test_suite_runs_every_attack_and_is_reproducible():
    data = make_synthetic(n_images=90, size=48, seed=3, images_per_patient=3)
    kwargs = {
        "split": SealedAttackSplit(probe_fraction=0.34),
        "dictionary_size": 2,
        "n_victims": 6,
        "radius": 3,
        "n_train_patches": 3000,
        "n_neighbors": 3,
    }
    first, examples = sealed_attack_suite(data.images, data.masks, data.pids, data.folds, **kwargs)
    again, _ = sealed_attack_suite(data.images, data.masks, data.pids, data.folds, **kwargs)
    assert first == again
    assert set(first["attacks"]) == {
        "public mean (no features; reference)",
        "nearest template",
        "mean of 3 nearest templates",
        "ridge regression (FV → ROI crop, thumbnail)",
    }
    for scores in first["attacks"].values():
        assert 0 <= scores["roi"]["ssim"]["median"] <= 1 and scores["slice"]["ssim"]["n"] == 6
    assert first["membership"]["exact_copy_distance"] == 0.0
    assert 0 <= first["membership"]["auc"] <= 1
    assert examples["plain"].shape == (48, 48)
