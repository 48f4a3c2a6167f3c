"""End to end on synthetic data: retrieval clearly beats chance on plain and cipher images."""

import io

import numpy as np
import pytest

from pecore.cipher import encrypt
from pecore.datasets import make_synthetic
from pecore.evaluate import retrieval_metrics
from pecore.keys import MasterKey, SSLMKey, derive_image_key, key_stream
from pecore.pipeline import CBIRPipeline

PARAMS = dict(n_components=4, radius=3, n_train_patches=20_000, dim=2, random_state=0, n_jobs=2)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_images=75, size=48, seed=3)


def _cipher(data, mode):
    if mode == "plain":
        return data.images
    if mode == "same":
        stream = key_stream(SSLMKey(), data.images[0].size)
        return np.stack([encrypt(im, stream, "ours") for im in data.images])
    master = MasterKey.from_seed(7)
    return np.stack(
        [
            encrypt(im, derive_image_key(master, str(i), im.size).stream(), "ours")
            for i, im in zip(data.index, data.images, strict=True)
        ]
    )


@pytest.mark.parametrize("mode", ["plain", "same", "different"])
def test_retrieval_beats_chance(data, mode):
    images = _cipher(data, mode)
    train, query = data.folds != 1, data.folds == 1
    pipe = CBIRPipeline(**PARAMS).fit(images[train], data.masks[train], data.labels[train])
    zq = pipe.transform(images[query], data.masks[query])
    zd = pipe.transform(images[train], data.masks[train])
    assert zq.dtype == np.float32 and zq.shape == (query.sum(), 2)
    scores = retrieval_metrics(zq, data.labels[query], zd, data.labels[train])
    chance = np.mean([np.mean(data.labels[train] == c) for c in data.labels[query]])
    assert scores["mAP"] > chance + 0.25, (mode, scores["mAP"], chance)


def test_save_load_round_trip_and_errors(data, tmp_path):
    train = data.folds != 2
    pipe = CBIRPipeline(**PARAMS).fit(data.images[train], data.masks[train], data.labels[train])
    fv = pipe.fisher_vectors(data.images[:5], data.masks[:5])
    assert fv.dtype == np.float32
    assert fv.shape[1] == 8 * 2 * 4 * pipe.pca_.n_components_
    np.testing.assert_allclose(pipe.transform(data.images[:5], data.masks[:5]), pipe.project(fv))
    buffer = io.BytesIO()
    pipe.save(buffer)
    buffer.seek(0)
    loaded = CBIRPipeline.load(buffer)
    np.testing.assert_array_equal(
        loaded.transform(data.images[:5], data.masks[:5]), pipe.project(fv)
    )
    pipe.save(tmp_path / "model.npz")
    assert CBIRPipeline.load(tmp_path / "model.npz").get_params() == pipe.get_params()
    with pytest.raises(ValueError, match="features"):
        pipe.project(fv[:, :-1])
    with pytest.raises(RuntimeError, match="not fitted"):
        CBIRPipeline().project(fv)
    with pytest.raises(ValueError):
        CBIRPipeline(**PARAMS).fit(data.images[:3], data.masks[:2], data.labels[:3])


def test_synthetic_dataset_is_patient_disjoint_and_balanced():
    data = make_synthetic(n_images=30, size=40, seed=1)
    data.check_patient_disjoint()
    assert set(np.unique(data.labels)) == {1, 2, 3}
    assert set(np.unique(data.folds)) <= {1, 2, 3, 4, 5}
    assert data.images.dtype == np.uint8 and data.masks.dtype == bool
    assert np.array_equal(data.images, make_synthetic(n_images=30, size=40, seed=1).images)


def test_tile_reflected_patches_are_numpy_only_and_saved_only_when_set(data, tmp_path):
    """patch_tile (pe-roi's "-rf"): the numpy path computes it, the torch path refuses it before
    any work; a model without it saves the same parameters as before the option existed."""
    import json

    train = data.folds != 2
    params = {**PARAMS, "radius": 2}
    plain = CBIRPipeline(**params).fit(data.images[train], data.masks[train], data.labels[train])
    tiled = CBIRPipeline(**params, patch_tile=16)
    tiled.fit(data.images[train], data.masks[train], data.labels[train])
    # different patches, so a different model and different vectors
    assert not np.array_equal(
        tiled.transform(data.images[:5], data.masks[:5]),
        plain.transform(data.images[:5], data.masks[:5]),
    )
    saved = {}
    for name, pipe in (("plain", plain), ("tiled", tiled)):
        pipe.save(tmp_path / f"{name}.npz")
        with np.load(tmp_path / f"{name}.npz") as arrays:
            saved[name] = json.loads(str(arrays["meta_json"]))["params"]
    assert "patch_tile" not in saved["plain"] and saved["tiled"]["patch_tile"] == 16
    loaded = CBIRPipeline.load(tmp_path / "tiled.npz")
    assert loaded.patch_tile == 16
    np.testing.assert_array_equal(
        loaded.transform(data.images[:5], data.masks[:5]),
        tiled.transform(data.images[:5], data.masks[:5]),
    )
    torch = CBIRPipeline(**params, patch_tile=16, backend="torch")
    with pytest.raises(ValueError, match="numpy back end only"):
        torch.fit(data.images[train], data.masks[train], data.labels[train])
    loaded.backend = "torch"
    with pytest.raises(ValueError, match="numpy back end only"):
        loaded.transform(data.images[:5], data.masks[:5])
