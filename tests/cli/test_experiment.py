"""The experiment runner on synthetic data (the full run needs the dataset; see results/table1)."""

import json

import numpy as np
import pytest

from pecbir.experiment import (
    Condition,
    ExperimentConfig,
    cipher_images,
    markdown_tables,
    plot_map_vs_d,
    read_fold_file,
    run_fold,
    summarise,
)
from pecore.datasets import make_synthetic


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_images=60, size=48, seed=5)


def test_fold_results_tables_and_plot(data, tmp_path):
    config = ExperimentConfig(
        dictionary_sizes=(2, 4),
        conditions=(Condition(None), Condition("ours", "different")),
        folds=(1, 2),
        radius=3,
        n_train_patches=5000,
        cache_dir=str(tmp_path),
    )
    stacks = cipher_images(data.images, data.index, config.conditions, 11, tmp_path)
    assert stacks["non-secure"] is data.images
    assert not np.array_equal(stacks["ours/different"], data.images)
    again = cipher_images(data.images, data.index, config.conditions, 11, tmp_path)  # cached
    np.testing.assert_array_equal(again["ours/different"], stacks["ours/different"])
    fold_results = {}
    for condition in config.conditions:
        images = stacks[condition.name]
        fold_results[condition.name] = {
            fold: run_fold(
                images, data.masks, data.labels, data.folds, fold, [2, 4], config, [0, fold, 1]
            )
            for fold in config.folds
        }
    first = fold_results["non-secure"][1][4]
    assert first["n_query"] == int(np.sum(data.folds == 1))
    assert "1" in first["by_dim"] and first["pca_dim"] >= 1
    results = json.loads(json.dumps(summarise(config, fold_results, "x")))
    entry = results["summary"]["non-secure"]["4"]["1"]
    maps = [fold_results["non-secure"][f][4]["by_dim"]["1"]["mAP"] * 100 for f in (1, 2)]
    assert entry["mAP"]["mean"] == pytest.approx(np.mean(maps))
    assert entry["mAP"]["std"] == pytest.approx(np.std(maps))
    assert entry["mAP"]["mean"] > 60  # chance is about 33 %
    text = markdown_tables(results, dim=1)
    assert "| 4 | Non-secure [3] |" in text and "diff. keys Ours" in text
    plot_map_vs_d(results, tmp_path / "plot.png", dim=1)
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_fold_file_maps_index_to_fold(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("index,fold\n1,2\n2,1\n3,2\n")
    np.testing.assert_array_equal(read_fold_file(path, np.array([3, 1, 2])), [2, 2, 1])
    with pytest.raises(ValueError, match="no fold"):
        read_fold_file(path, np.array([1, 4]))
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        read_fold_file(tmp_path / "bad.csv", np.array([1]))


@pytest.mark.parametrize(
    "argv",
    [
        ["--conditions", "non-secure,42"],
        ["--key-modes", "sometimes"],
        ["--dict-sizes", "0"],
    ],
)
def test_cli_rejects_bad_selections_before_any_work(argv, capsys):
    from pecbir.cli import main

    assert main(["experiment", *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_same_key_cipher_stack_equals_direct_encryption(tmp_path):
    from pecore.cipher import encrypt
    from pecore.keys import SSLMKey, key_stream

    data = make_synthetic(n_images=8, size=40, seed=2)
    stacks = cipher_images(data.images, data.index, [Condition("27", "same")], 0, tmp_path)
    stream = key_stream(SSLMKey(), 40 * 40)
    for image, cipher in zip(data.images, stacks["27/same"], strict=True):
        np.testing.assert_array_equal(cipher, encrypt(image, stream, "27"))


def test_tile_scrambled_variant_runs_end_to_end_with_its_own_masks(tmp_path):
    from pecbir.experiment import _unit_key, condition_masks
    from pecore.cipher_variants import encrypt_variant, scramble_mask
    from pecore.keys import MasterKey, derive_image_key, key_stream

    data = make_synthetic(n_images=60, size=48, seed=5)
    variant = Condition("ours-bs16", "different")
    plain = Condition("ours", "different")
    assert variant.is_variant and not plain.is_variant
    config = ExperimentConfig(
        dictionary_sizes=(2,), conditions=(plain, variant), radius=3, n_train_patches=5000
    )
    with pytest.raises(ValueError, match="masks"):
        cipher_images(data.images, data.index, [variant], 11, tmp_path)
    stacks = cipher_images(data.images, data.index, [plain, variant], 11, tmp_path, data.masks)
    masks = condition_masks(data.masks, data.index, [plain, variant], 11, tmp_path)
    assert masks["ours/different"] is data.masks
    moved = masks["ours-bs16/different"]
    assert moved.dtype == bool and not np.array_equal(moved, data.masks)
    # the cached stacks are what the owner would upload: cipher and mask moved together
    for i in (0, 7):
        key = derive_image_key(MasterKey.from_seed(11), str(int(data.index[i])), 48 * 48)
        stream = key_stream(key.sslm, 48 * 48)
        nonce = str(int(data.index[i]))
        np.testing.assert_array_equal(
            stacks["ours-bs16/different"][i],
            encrypt_variant(data.images[i], stream, "ours-bs16", nonce=nonce),
        )
        np.testing.assert_array_equal(
            moved[i], scramble_mask(data.masks[i], stream, "ours-bs16", nonce=nonce)
        )
    # the standard scheme's stack is unchanged by the variant built in the same pass
    np.testing.assert_array_equal(
        stacks["ours/different"],
        cipher_images(data.images, data.index, [plain], 11, tmp_path / "alone")["ours/different"],
    )
    # variant units are cached under their own key; standard keys carry no mask tag
    assert _unit_key(config, variant, 1, 2, "x") != _unit_key(config, plain, 1, 2, "x")
    result = run_fold(
        stacks["ours-bs16/different"], moved, data.labels, data.folds, 1, [2], config, [0, 1, 2]
    )[2]
    assert result["by_dim"]["1"]["mAP"] > 0.5  # chance is about 1/3


def test_variant_roi_dilated_by_the_owner_is_the_scrambled_plain_roi(tmp_path):
    from pecbir.experiment import condition_masks
    from pecore.cipher_variants import scramble_mask
    from pecore.keys import SSLMKey, key_stream
    from pecore.roi import dilate_mask

    data = make_synthetic(n_images=6, size=48, seed=3)
    variant = Condition("ours-bs16", "same")
    cipher_images(data.images, data.index, [variant], 0, tmp_path, data.masks, dilate=3)
    with pytest.raises(FileNotFoundError, match="no scrambled masks"):
        condition_masks(data.masks, data.index, [variant], 0, tmp_path)  # other dilation
    rois = condition_masks(data.masks, data.index, [variant], 0, tmp_path, 3)[variant.name]
    stream = key_stream(SSLMKey(), 48 * 48)
    for i in range(len(data.images)):
        expected = scramble_mask(
            dilate_mask(data.masks[i], 3), stream, "ours-bs16", nonce=str(int(data.index[i]))
        )
        np.testing.assert_array_equal(rois[i], expected)
