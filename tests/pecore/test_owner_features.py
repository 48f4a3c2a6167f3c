"""pecore.owner_features: the sealed mode's owner-side Fisher vectors equal the cloud's."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pecore.owner_features import PatchModelFeaturizer
from pecore.pipeline import CBIRPipeline

PARAMS = {"n_components": 3, "n_regions": 2, "patch_size": 3, "radius": 2, "n_train_patches": 500}


def _data(n: int = 12):
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 2, 3], n // 3)
    images = rng.integers(0, 200, (n, 32, 32)).astype(np.uint8)
    for image, label in zip(images, labels, strict=True):
        image[12:20, 12:20] += np.uint8(15 * label)
    masks = np.zeros((n, 32, 32), dtype=bool)
    masks[:, 14:18, 14:18] = True
    return images, masks, labels


def test_owner_features_plus_cloud_metric_equal_the_one_stage_pipeline():
    images, masks, labels = _data()
    whole = CBIRPipeline(**PARAMS, dim=2).fit(images, masks, labels)
    owner = PatchModelFeaturizer(**PARAMS).fit(images, masks)
    published = PatchModelFeaturizer.from_bytes(owner.to_bytes())
    fisher = published.fisher_vectors(images, masks)
    np.testing.assert_array_equal(fisher, whole.fisher_vectors(images, masks))
    cloud = published.pipeline(dim=2).fit_metric(fisher, labels)
    np.testing.assert_array_equal(cloud.project(fisher), whole.transform(images, masks))
    saved = io.BytesIO()
    cloud.save(saved)
    saved.seek(0)
    np.testing.assert_array_equal(CBIRPipeline.load(saved).project(fisher), cloud.project(fisher))


def test_features_are_deterministic_and_artifacts_are_checked():
    images, masks, _ = _data()
    owner = PatchModelFeaturizer(**PARAMS).fit(images, masks)
    first = owner.fisher_vectors(images[:1], masks[:1])
    for _ in range(3):
        np.testing.assert_array_equal(owner.fisher_vectors(images[:1], masks[:1]), first)
    assert first.shape == (1, owner.n_features)
    with pytest.raises(ValueError, match="not a patch model"):
        PatchModelFeaturizer.from_bytes(b"junk")
    with pytest.raises(ValueError, match="expected"):
        owner.pipeline(dim=2).fit_metric(first[:, :5], [1])
