"""The experiment runner on synthetic data (the full run needs the dataset; see results/table1)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from pecbir.experiment import (
    Condition,
    ExperimentConfig,
    cipher_images,
    markdown_tables,
    plot_map_vs_d,
    read_headline_map,
    summarise,
)
from pecore.datasets import make_synthetic
from pecore.model_selection import evaluate_fold, fold_seed


def run_fold(images, masks, labels, folds, fold, sizes, config, seed_words):
    """One fold as `run_experiment` runs it (the CLI's config spelled out as keywords)."""
    return evaluate_fold(
        images,
        masks,
        labels,
        folds,
        query_fold=fold,
        dictionary_sizes=sizes,
        **config.fold_params(),
        random_state=fold_seed(seed_words),
    )


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_images=60, size=48, seed=5)


def test_fold_results_tables_and_plot(data, tmp_path):
    config = ExperimentConfig(
        dictionary_sizes=(2, 4),
        conditions=(Condition(None), Condition("ours", "per-image")),
        folds=(1, 2),
        radius=3,
        n_train_patches=5000,
        cache_dir=str(tmp_path),
    )
    stacks = cipher_images(data.images, data.index, config.conditions, 11, tmp_path)
    assert stacks["non-secure"] is data.images
    assert not np.array_equal(stacks["ours/per-image"], data.images)
    again = cipher_images(data.images, data.index, config.conditions, 11, tmp_path)  # cached
    np.testing.assert_array_equal(again["ours/per-image"], stacks["ours/per-image"])
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
    for image, cipher in zip(data.images, stacks["chained/same"], strict=True):
        np.testing.assert_array_equal(cipher, encrypt(image, stream, "27"))


def test_tile_scrambled_variant_runs_end_to_end_with_its_own_masks(tmp_path):
    from pecbir.experiment import _unit_key, condition_masks
    from pecore.cipher_variants import encrypt_variant, scramble_mask
    from pecore.keys import MasterKey, derive_image_key, key_stream

    data = make_synthetic(n_images=60, size=48, seed=5)
    variant = Condition("ours-bs16", "per-image")
    plain = Condition("ours", "per-image")
    assert variant.is_variant and not plain.is_variant
    config = ExperimentConfig(
        dictionary_sizes=(2,), conditions=(plain, variant), radius=3, n_train_patches=5000
    )
    with pytest.raises(ValueError, match="masks"):
        cipher_images(data.images, data.index, [variant], 11, tmp_path)
    stacks = cipher_images(data.images, data.index, [plain, variant], 11, tmp_path, data.masks)
    masks = condition_masks(data.masks, data.index, [plain, variant], 11, tmp_path)
    assert masks["ours/per-image"] is data.masks
    moved = masks["ours-bs16/per-image"]
    assert moved.dtype == bool and not np.array_equal(moved, data.masks)
    # the cached stacks are what the owner would upload: cipher and mask moved together
    for i in (0, 7):
        key = derive_image_key(MasterKey.from_seed(11), str(int(data.index[i])), 48 * 48)
        stream = key_stream(key.sslm, 48 * 48)
        nonce = str(int(data.index[i]))
        np.testing.assert_array_equal(
            stacks["ours-bs16/per-image"][i],
            encrypt_variant(data.images[i], stream, "ours-bs16", nonce=nonce),
        )
        np.testing.assert_array_equal(
            moved[i], scramble_mask(data.masks[i], stream, "ours-bs16", nonce=nonce)
        )
    # the standard scheme's stack is unchanged by the variant built in the same pass
    np.testing.assert_array_equal(
        stacks["ours/per-image"],
        cipher_images(data.images, data.index, [plain], 11, tmp_path / "alone")["ours/per-image"],
    )
    # variant units are cached under their own key; standard keys carry no mask tag
    assert _unit_key(config, variant, 1, 2, "x") != _unit_key(config, plain, 1, 2, "x")
    result = run_fold(
        stacks["ours-bs16/per-image"], moved, data.labels, data.folds, 1, [2], config, [0, 1, 2]
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


def test_old_key_mode_spelling_is_read_as_per_image_and_keeps_seeds_and_cache_names():
    old, new = Condition("ours", "different"), Condition("ours", "per-image")
    assert old == new and old.name == "ours/per-image"
    # seeds and cache file names were derived from the old spelling: keeping it keeps the numbers
    assert new.seed_name == "ours/different" and new.slug == "ours-different"
    assert Condition("ours", "same").seed_name == "ours/same"
    assert Condition.from_name("27/different") == Condition("27", "per-image")
    with pytest.raises(ValueError, match="unknown key mode"):
        Condition("ours", "sometimes")


def test_cli_accepts_the_old_key_mode_spelling(monkeypatch):
    import pecbir.experiment
    from pecbir.cli import main

    seen = {}

    def fake_run(config):
        seen["conditions"] = [c.name for c in config.conditions]
        raise SystemExit(0)

    monkeypatch.setattr(pecbir.experiment, "run_experiment", fake_run)
    with pytest.raises(SystemExit):
        main(["experiment", "--conditions", "ours", "--key-modes", "different,per-image"])
    assert seen["conditions"] == ["ours/per-image"]


def _results_document(names_to_map: dict[str, dict[str, float]]) -> dict:
    def entry(value):
        return {"mAP": {"mean": value, "std": 0.5, "n": 5}}

    return {
        "config": {"headline_dim": 10, "folds": [1, 2, 3, 4, 5]},
        "summary": {
            name: {size: {"10": entry(v)} for size, v in by_size.items()}
            for name, by_size in names_to_map.items()
        },
    }


def test_headline_map_reads_old_and_new_spellings_at_the_largest_d(tmp_path):
    document = _results_document(
        {
            "non-secure": {"16": 89.9, "64": 94.0},
            "ours/same": {"16": 80.0, "64": 85.0},
            "27/different": {"16": 60.0},
            "26/per-image": {"32": 70.0},
        }
    )
    document["summary"]["ours/same"]["64"]["9"] = {"mAP": {"mean": 1.0}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(document))
    found, reason = read_headline_map(path)
    assert found == {
        ("plain", "same"): 94.0,
        ("ours", "same"): 85.0,
        ("chained", "per-image"): 60.0,  # old names are read as the registry's
        ("xor", "per-image"): 70.0,
    }
    assert "dim 10" in reason


def test_headline_map_names_pe_roi_by_the_spelling_it_was_computed_under(tmp_path):
    """ "pe-roi" is whichever configuration was chosen when a file was written: the file's
    `roi_schemes` says which; an explicit spelling is itself; the chosen one changes."""
    from pecore.cipher_roi import RoiCipher

    path = tmp_path / "results.json"
    document = _results_document(
        {"pe-roi/per-image": {"64": 84.1}, "pe-roi-t32/same": {"16": 80.0}}
    )
    document["config"]["roi_schemes"] = {"pe-roi": "pe-roi-t16dn-in"}
    path.write_text(json.dumps(document))
    assert read_headline_map(path)[0] == {
        ("pe-roi-t16dn-in", "per-image"): 84.1,
        ("pe-roi-t32", "same"): 80.0,
    }
    del document["config"]["roi_schemes"]  # a file from before the field: today's choice
    path.write_text(json.dumps(document))
    assert (RoiCipher().legacy_name, "per-image") in read_headline_map(path)[0]


def test_markdown_tables_of_an_old_results_file_show_the_paper_numbers():
    document = _results_document({"ours/different": {"16": 80.0}})
    for entry in document["summary"]["ours/different"]["16"].values():
        entry.update({"P@5": entry["mAP"], "P@10": entry["mAP"], "per_class": {}})
    document["config"].update({"dictionary_sizes": [16], "conditions": ["ours/different"]})
    text = markdown_tables(document, dim=10)
    assert "| 16 | diff. keys Ours | 80.00 ± 0.50 |" in text
    assert "| 83.52 | -3.52 |" in text  # paper Table 1, D = 16, ours with per-image keys


def test_sealed_condition_fits_the_grid_and_runs_on_the_plain_images(tmp_path, monkeypatch):
    import pecbir.experiment
    from pecbir.cli import main
    from pecbir.experiment import SEALED, all_conditions

    sealed = Condition(SEALED)
    assert sealed == Condition("sealed", "different") == Condition.from_name("sealed/per-image")
    assert sealed.name == sealed.seed_name == "sealed/per-image"
    assert sealed.slug == "sealed-per-image"
    assert sealed.is_sealed and not sealed.is_variant and sealed.label.startswith("Sealed")
    with pytest.raises(ValueError, match="own data key"):
        Condition(SEALED, "same")
    data = make_synthetic(n_images=6, size=40, seed=2)
    stacks = cipher_images(data.images, data.index, [sealed], 0, tmp_path)
    assert stacks["sealed/per-image"] is data.images  # the owner featurises the plain images
    assert [c.name for c in all_conditions(["ours"], ["same"], True, sealed=True)] == [
        "non-secure",
        "ours/same",
        "sealed/per-image",
    ]
    seen = {}

    def fake_run(config):
        seen["conditions"] = [c.name for c in config.conditions]
        raise SystemExit(0)

    monkeypatch.setattr(pecbir.experiment, "run_experiment", fake_run)
    with pytest.raises(SystemExit):
        main(["experiment", "--conditions", "non-secure,sealed", "--key-modes", "same"])
    assert seen["conditions"] == ["non-secure", "sealed/per-image"]


def test_pe_roi_condition_caches_its_cloud_masks_and_uses_them_undilated(tmp_path):
    from pecbir.experiment import _unit_key, condition_masks
    from pecore.cipher_roi import RoiCipher
    from pecore.keys import MasterKey, derive_image_key, key_stream

    data = make_synthetic(n_images=60, size=48, seed=5)
    roi = Condition("pe-roi-t16d", "per-image")
    plain = Condition("ours", "per-image")
    assert roi.is_roi and roi.is_variant and not plain.is_roi
    with pytest.raises(ValueError, match="masks"):
        cipher_images(data.images, data.index, [roi], 11, tmp_path)
    stacks = cipher_images(data.images, data.index, [plain, roi], 11, tmp_path, data.masks)
    moved = condition_masks(data.masks, data.index, [roi], 11, tmp_path)[roi.name]
    scheme = RoiCipher.from_name("pe-roi-t16d")
    for i in (0, 9):
        key = derive_image_key(MasterKey.from_seed(11), str(int(data.index[i])), 48 * 48)
        stream = key_stream(key.sslm, 48 * 48)
        nonce = str(int(data.index[i]))
        np.testing.assert_array_equal(
            stacks[roi.name][i],
            scheme.encrypt(data.images[i], stream, mask=data.masks[i], nonce=nonce),
        )
        np.testing.assert_array_equal(
            moved[i], scheme.cloud_mask(data.masks[i], stream, nonce=nonce)
        )
    config = ExperimentConfig(dictionary_sizes=(2,), conditions=(plain, roi))
    assert _unit_key(config, roi, 1, 2, "x") != _unit_key(config, plain, 1, 2, "x")
    # the results file says which explicit spelling each pe-roi condition was computed under
    chosen = Condition("pe-roi", "per-image")
    written = summarise(replace(config, conditions=(plain, roi, chosen)), {}, "x")["config"]
    assert written["roi_schemes"] == {
        roi.scheme: "pe-roi-t16d",
        "pe-roi": RoiCipher().legacy_name,
    }


def test_pe_roi_selection_is_privacy_first_then_training_map():
    from pecbir.commands.pe_roi_select import choose, roi_privacy

    measured = {"pe-roi-t16dn": 81.47, "pe-roi-t16": 81.9, "pe-roi-t32": 85.36}
    # per slice, the best attack stage counts; the oracle (true keys) is no attack
    slices = {
        "pe-roi-t16dn": [(0.10, 0.20), (0.05, 0.26)],
        "pe-roi-t16": [(0.10, 0.39), (0.02, 0.17)],
        "pe-roi-t32": [(0.01, 0.84), (0.01, 0.20)],
    }
    report = {
        "per_slice": {
            name: [
                {
                    "pixel": {"ssim_roi": pixel},
                    "jigsaw": {"ssim_roi": jigsaw},
                    "oracle": {"ssim_roi": 0.9},
                    "id": {"row": row},
                }
                for row, (pixel, jigsaw) in enumerate(values)
            ]
            for name, values in slices.items()
        }
    }
    folds = np.array([2, 3])
    privacy = roi_privacy(report, folds, outer_fold=1)
    assert privacy["pe-roi-t16"] == {"median": pytest.approx(0.28), "worst": 0.39, "n_slices": 2}
    assert choose(measured, privacy, 0.30) == "pe-roi-t16dn"
    assert choose(measured, privacy, 0.40) == "pe-roi-t16"
    assert choose(measured, privacy, 0.20) is None
    # a slice of the outer (query) fold never counts: without row 0, t32's worst is 0.20
    assert choose(measured, roi_privacy(report, np.array([1, 3]), 1), 0.30) == "pe-roi-t32"
    # a candidate the report did not attack is not eligible
    assert choose({**measured, "pe-roi-t8": 99.0}, privacy, 0.30) == "pe-roi-t16dn"
    # "<base>-in" has its base's cloud image and a mask that is a function of the base's:
    # it takes the base's attack numbers; an "-in" of an unattacked base stays ineligible
    from pecbir.commands.pe_roi_select import inherit_privacy

    names = [*measured, "pe-roi-t16dn-in", "pe-roi-t8-in"]
    inherited = inherit_privacy(names, privacy)
    assert inherited["pe-roi-t16dn-in"] == {
        **privacy["pe-roi-t16dn"],
        "attacked_as": "pe-roi-t16dn",
    }
    assert "pe-roi-t8-in" not in inherited
    both = {**measured, "pe-roi-t16dn-in": 82.0, "pe-roi-t8-in": 99.0}
    assert choose(both, inherited, 0.30) == "pe-roi-t16dn-in"


def test_interior_pe_roi_condition_featurises_only_patches_inside_tiles(tmp_path):
    from pecbir.experiment import condition_masks

    data = make_synthetic(n_images=12, size=48, seed=6)
    full, inside = Condition("pe-roi-t16dn", "per-image"), Condition("pe-roi-t16dn-in", "per-image")
    stacks = cipher_images(data.images, data.index, [full, inside], 11, tmp_path, data.masks)
    masks = condition_masks(data.masks, data.index, [full, inside], 11, tmp_path)
    np.testing.assert_array_equal(stacks[full.name], stacks[inside.name])  # same cloud image
    grid = np.zeros(48, dtype=bool)
    for start in (4, 20, 36):
        grid[start : start + 8] = True
    interior = grid[:, None] & grid[None, :]
    np.testing.assert_array_equal(masks[inside.name], masks[full.name] & interior)
    assert masks[inside.name].any() and full.seed_name != inside.seed_name


def test_a_scheme_and_its_interior_twin_share_their_worst_attacks():
    from pecbir.commands.pe_roi_select import roi_privacy

    def entry(row, jigsaw):
        return {"pixel": {"ssim_roi": 0.01}, "jigsaw": {"ssim_roi": jigsaw}, "id": {"row": row}}

    report = {
        "per_slice": {
            "pe-roi-t16dn": [entry(0, 0.26), entry(1, 0.05)],
            "pe-roi-t16dn-in": [entry(0, 0.20), entry(1, 0.28)],
            "pe-roi-t16": [entry(0, 0.39), entry(1, 0.40)],
        }
    }
    privacy = roi_privacy(report, np.array([2, 3]), outer_fold=1)
    # per slice the best attack on either twin: 0.26 and 0.28
    for name in ("pe-roi-t16dn", "pe-roi-t16dn-in"):
        assert privacy[name]["worst"] == 0.28 and privacy[name]["median"] == pytest.approx(0.27)
    assert privacy["pe-roi-t16"]["worst"] == 0.40  # no twin in the report


def test_a_pe_roi_scheme_fixes_the_patch_size_of_its_folds(tmp_path):
    from pecbir.commands.pe_roi_select import inherit_privacy
    from pecbir.experiment import condition_fold_config, condition_masks

    config = ExperimentConfig(dictionary_sizes=(2,))
    small = Condition("pe-roi-t16dn-in-p7", "per-image")
    chosen = Condition("pe-roi", "per-image")
    assert (condition_fold_config(config, small).patch_size, small.seed_name) == (
        7,
        "pe-roi-t16dn-in-p7/different",
    )
    assert condition_fold_config(config, small).radius == 0
    assert condition_fold_config(config, chosen).patch_size == 9
    plain = Condition("ours", "per-image")
    assert condition_fold_config(config, plain) == config
    # "-rf": the whole moved ROI, every patch cut from its own tile (patch_tile = the tile);
    # the parameters of every other condition do not name patch_tile (their cache keys stay)
    reflected = condition_fold_config(config, Condition("pe-roi-t16dn-rf", "per-image"))
    assert (reflected.patch_tile, reflected.patch_size, reflected.radius) == (16, 9, 0)
    assert reflected.fold_params()["patch_tile"] == 16
    assert condition_fold_config(config, chosen).patch_tile is None
    assert "patch_tile" not in condition_fold_config(config, chosen).fold_params()
    assert "patch_tile" not in config.model_params()
    # the same cloud image as pe-roi-t16dn (same margin), the interiors of 7×7 patches as mask
    data = make_synthetic(n_images=8, size=48, seed=7)
    full = Condition("pe-roi-t16dn", "per-image")
    stacks = cipher_images(data.images, data.index, [full, small], 11, tmp_path, data.masks)
    masks = condition_masks(data.masks, data.index, [full, small], 11, tmp_path)
    assert stacks[full.name].tobytes() == stacks[small.name].tobytes()
    grid = np.zeros(48, dtype=bool)
    for start in (3, 19, 35):
        grid[start : start + 10] = True
    np.testing.assert_array_equal(masks[small.name], masks[full.name] & grid[:, None] & grid)
    # its privacy is its cloud image's: pe-roi-t16dn's attack numbers
    privacy = {"pe-roi-t16dn": {"median": 0.1, "worst": 0.2, "n_slices": 2}}
    assert inherit_privacy(["pe-roi-t16dn-in-p7", "pe-roi-t16-in-p5"], privacy) == {
        "pe-roi-t16dn-in-p7": {**privacy["pe-roi-t16dn"], "attacked_as": "pe-roi-t16dn"}
    }


def test_extra_lambdas_reuse_and_extend_the_one_lambda_units(tmp_path, monkeypatch):
    import pecore.datasets
    from pecbir.experiment import _unit_key, run_experiment

    data = make_synthetic(n_images=45, size=40, seed=3)
    monkeypatch.setattr(pecore.datasets, "load_figshare", lambda path, cache_dir=None: data)
    (tmp_path / "data.h5").write_bytes(b"synthetic")
    config = ExperimentConfig(
        dictionary_sizes=(2,),
        conditions=(Condition("ours", "per-image"),),
        folds=(1, 2),
        radius=3,
        n_train_patches=3000,
        n_jobs=1,
        data_path=str(tmp_path / "data.h5"),
        cache_dir=str(tmp_path / "cache"),
    )
    # the default keys are the ones every existing cache holds: extra λ do not enter them
    condition = config.conditions[0]
    key = _unit_key(config, condition, 1, 2, "x")
    assert _unit_key(replace(config, extra_lambdas=(1e-2,)), condition, 1, 2, "x") == key
    assert _unit_key(replace(config, metric_lambda=1e-2), condition, 1, 2, "x") != key
    units = tmp_path / "cache" / "experiment_units"

    plain = run_experiment(replace(config, extra={}))
    first_units = {p.name: p.read_text() for p in units.iterdir()}
    assert len(first_units) == 2 and "summary_by_lambda" not in plain
    assert "metric_lambdas" not in plain["config"]

    several = run_experiment(replace(config, extra_lambdas=(1.5e-4, 1e-2), extra={}))
    # the headline λ's units were taken from the cache, untouched; λ = 1e-2 got its own
    assert all(r["2"]["cached"] for r in several["folds"]["ours/per-image"].values())
    now = {p.name: p.read_text() for p in units.iterdir()}
    assert len(now) == 4 and all(now[name] == text for name, text in first_units.items())
    assert several["summary"] == plain["summary"]
    assert several["config"]["metric_lambdas"] == [1.5e-4, 1e-2]
    assert list(several["summary_by_lambda"]) == ["0.00015", "0.01"]
    assert several["summary_by_lambda"]["0.00015"] == plain["summary"]
    other = several["folds_by_lambda"]["0.01"]["ours/per-image"]["1"]["2"]
    assert (
        other["cfml_eigenvalues"] != plain["folds"]["ours/per-image"]["1"]["2"]["cfml_eigenvalues"]
    )
    text = markdown_tables(several, dim=1)
    assert "## mAP against the CFML ridge λ" in text and "| λ = 0.00015 | λ = 0.01 |" in text

    # a run at λ = 1e-2 alone finds every unit cached under its own keys, with the same numbers
    alone = run_experiment(replace(config, metric_lambda=1e-2, extra={}))
    assert all(r["2"]["cached"] for r in alone["folds"]["ours/per-image"].values())
    assert alone["summary"] == several["summary_by_lambda"]["0.01"]
    assert (
        alone["folds"]["ours/per-image"]["1"]["2"]["cfml_eigenvalues"] == other["cfml_eigenvalues"]
    )
    assert len(list(units.iterdir())) == 4


def test_cli_passes_metric_lambdas_headline_first(monkeypatch):
    import pecbir.experiment
    from pecbir.cli import main

    seen = {}

    def fake_run(config):
        seen["lambdas"] = (config.metric_lambda, config.extra_lambdas)
        raise SystemExit(0)

    monkeypatch.setattr(pecbir.experiment, "run_experiment", fake_run)
    with pytest.raises(SystemExit):
        main(["experiment", "--conditions", "ours", "--metric-lambdas", "1e-2,1.5e-4,1"])
    assert seen["lambdas"] == (1e-2, (1.5e-4, 1.0))
    with pytest.raises(SystemExit):
        main(["experiment", "--conditions", "ours"])
    assert seen["lambdas"] == (1.5e-4, ())  # the default: Cheng's λ alone, keys unchanged
    with pytest.raises(SystemExit) as error:
        main(["experiment", "--metric-lambdas", "0,1"])
    assert error.value.code == 2  # argparse's usage error, before any work


def test_lambda_rule_takes_the_best_training_map_and_says_whether_it_clears_the_noise():
    from pecbir.commands.lambda_select import choose_lambdas

    table = {
        16: {1.5e-4: 85.0, 1e-2: 85.5, 1.0: 80.0},
        64: {1.5e-4: 84.0, 1e-2: 86.5, 1.0: 86.5},  # a tie goes to the larger λ
    }
    choice = choose_lambdas(table, baseline=1.5e-4, margin=1.0)
    assert choice["per_d"][16] == {"lambda": 1e-2, "map": 85.5, "gain": 0.5, "clear": False}
    assert choice["per_d"][64]["lambda"] == 1.0 and choice["per_d"][64]["clear"]
    assert choice["common"]["lambda"] == 1e-2  # mean over D: 86.0 against 84.5 and 83.25
    assert choice["common"]["gain"] == pytest.approx(1.5) and choice["common"]["clear"]


def test_lambda_select_leaves_the_outer_fold_out_and_records_every_lambda(tmp_path, monkeypatch):
    import pecore.datasets
    import pecore.model_selection
    from pecbir.cli import main

    data = make_synthetic(n_images=45, size=40, seed=3)
    monkeypatch.setattr(pecore.datasets, "load_figshare", lambda path, cache_dir=None: data)
    (tmp_path / "data.h5").write_bytes(b"synthetic")
    seen = []
    evaluate = pecore.model_selection.evaluate_fold

    def spy(images, masks, labels, folds, **kwargs):
        seen.append((len(images), sorted(set(folds.tolist())), kwargs["extra_lambdas"]))
        return evaluate(images, masks, labels, folds, **{**kwargs, "n_train_patches": 3000})

    monkeypatch.setattr(pecore.model_selection, "evaluate_fold", spy)
    argv = [
        "lambda-select",
        "--conditions",
        "ours",
        "--dict-sizes",
        "2",
        "--metric-lambdas",
        "1e-2,1",
        "--data",
        str(tmp_path / "data.h5"),
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
        "--jobs",
        "1",
    ]
    assert main(argv) == 0
    n_outer = int(np.sum(data.folds == 1))
    assert seen == [(len(data) - n_outer, [2, 3, 4, 5], [1.5e-4, 1e-2, 1.0])]  # baseline added
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    entry = document["conditions"]["ours/per-image"]
    assert list(entry["map_percent"]["2"]) == ["0.00015", "0.01", "1.0"]
    assert entry["chosen"]["per_d"]["2"]["lambda"] in (1.5e-4, 1e-2, 1.0)
    assert "| 2 |" in (tmp_path / "out" / "selection.md").read_text()
    assert main(argv) == 0  # every unit cached: no fold is computed again
    assert len(seen) == 1
