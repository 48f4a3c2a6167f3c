"""The experiment's sealed condition: the owner's vectors, and sealing loses no retrieval."""

from __future__ import annotations

import numpy as np
import pytest

from pecore.datasets import make_synthetic
from pecore.fisher import FisherVectorEncoder
from pecore.model_selection import evaluate_fold, fold_seed
from pecore.owner_features import owner_fisher_vectors
from pecore.pipeline import encode_images, fit_patch_model

PARAMS = {
    "n_regions": 8,
    "patch_size": 9,
    "radius": 3,
    "pca_energy": 0.99,
    "n_train_patches": 5000,
    "metric_lambda": 1.5e-4,
}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_images=60, size=48, seed=5)


@pytest.fixture(scope="module")
def model(data):
    return fit_patch_model(
        data.images[:40], data.masks[:40], [2, 4], patch_size=9, radius=3, n_train_patches=5000
    )


def test_owner_vectors_are_the_pipelines_vectors_in_float32(data, model):
    two, four = owner_fisher_vectors(data.images, data.masks, model, patch_size=9, radius=3)
    (reference,) = encode_images(
        data.images,
        data.masks,
        model.pca,
        [FisherVectorEncoder(model.gmms[4], n_regions=8)],
        patch_size=9,
        radius=3,
    )
    assert four.dtype.str == "<f4" and four.flags.c_contiguous
    np.testing.assert_array_equal(four, reference)
    assert two.shape == (60, reference.shape[1] // 2)
    (only,) = owner_fisher_vectors(
        data.images, data.masks, model, dictionary_sizes=[4], patch_size=9, radius=3
    )
    np.testing.assert_array_equal(only, four)


def test_owner_refuses_what_it_cannot_featurise(data, model):
    with pytest.raises(ValueError, match="no GMM of size"):
        owner_fisher_vectors(data.images, data.masks, model, dictionary_sizes=[8])
    with pytest.raises(ValueError, match="uint8"):
        owner_fisher_vectors(data.images.astype(np.float32), data.masks, model, radius=3)


def test_a_sealed_fold_scores_exactly_as_the_plain_fold_with_the_same_seed(data):
    def run(sealed):
        result = evaluate_fold(
            data.images,
            data.masks,
            data.labels,
            data.folds,
            query_fold=2,
            dictionary_sizes=[2, 4],
            random_state=fold_seed([0, 2, 9]),
            sealed=sealed,
            **PARAMS,
        )
        return {s: {k: v for k, v in r.items() if k != "timings_s"} for s, r in result.items()}

    sealed = run(True)
    assert sealed == run(False)
    assert sealed[4]["by_dim"]["1"]["mAP"] > 0.6  # chance is about 1/3
