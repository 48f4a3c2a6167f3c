"""The security report's reader of experiment results (no dataset needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pecbir.experiment import read_headline_map
from pecbir.security import best_ciphertext_only


def test_missing_results_mean_map_not_available(tmp_path):
    found, reason = read_headline_map(None)
    assert found == {} and "no experiment results" in reason
    found, reason = read_headline_map(tmp_path / "absent.json")
    assert found == {} and "does not exist" in reason
    (tmp_path / "bad.json").write_text("{not json")
    assert read_headline_map(tmp_path / "bad.json")[0] == {}
    (tmp_path / "other.json").write_text(json.dumps({"something": [1, 2, 3]}))
    assert read_headline_map(tmp_path / "other.json")[0] == {}


def test_reads_the_experiment_runner_summary_at_the_largest_d(tmp_path):
    def entry(value):
        return {"mAP": {"mean": value, "std": 0.5, "n": 5}}

    document = {
        "config": {"headline_dim": 10, "folds": [1, 2, 3, 4, 5]},
        "summary": {
            "non-secure": {"16": {"10": entry(89.9)}, "64": {"10": entry(94.0)}},
            "ours/same": {"16": {"10": entry(80.0)}, "64": {"10": entry(85.0), "9": entry(1.0)}},
            "27/different": {"16": {"10": entry(60.0)}},
        },
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(document))
    found, reason = read_headline_map(path)
    assert found == {
        ("plain", "same"): 94.0,
        ("ours", "same"): 85.0,
        ("chained", "per-image"): 60.0,  # "27/different", in the registry's names
    }
    assert "dim 10" in reason


def test_a_file_of_another_layout_is_not_guessed_at(tmp_path):
    # The old heuristic walker read any JSON with scheme/mode/mAP keys; the one reader now
    # reads only what `pecbir experiment` writes and says so.
    document = {"runs": [{"scheme": "ours", "key_mode": "different", "mAP": 0.81}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(document))
    found, reason = read_headline_map(path)
    assert found == {} and "not a `pecbir experiment` results.json" in reason


def test_best_attack_ignores_known_plaintext_and_the_raw_cipher():
    results = {
        "cipher image (no attack)": {"threat": "ciphertext-only", "ssim": {"mean": 0.9}},
        "median 3×3": {"threat": "ciphertext-only", "ssim": {"mean": 0.3}},
        "shared-mask inpainting": {"threat": "ciphertext-only, 16 ...", "ssim": {"mean": 0.5}},
        "known-plaintext (1 pair)": {"threat": "known plaintext", "ssim": {"mean": 0.99}},
    }
    assert best_ciphertext_only(results)[0] == "shared-mask inpainting"


def test_several_results_files_give_each_condition_its_most_complete_measurement(tmp_path):
    from pecbir.experiment import read_headline_maps

    def write(name, folds, summary):
        def entry(value):
            return {"10": {"mAP": {"mean": value, "std": 0.0, "n": len(folds)}}}

        document = {
            "config": {"headline_dim": 10, "folds": folds},
            "summary": {c: {d: entry(v) for d, v in by_d.items()} for c, by_d in summary.items()},
        }
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(document))
        return path

    quick = write("quick", [1], {"non-secure": {"16": 90.0}, "ours/same": {"16": 80.0}})
    table = write("table", [1, 2, 3, 4, 5], {"non-secure": {"16": 91.0, "64": 94.0}})
    sealed = write("sealed", [1, 2, 3, 4, 5], {"sealed/per-image": {"64": 94.5}})
    found, reason = read_headline_maps([quick, table, sealed])
    assert found == {
        ("plain", "same"): 94.0,  # five folds beat the quick run's one
        ("ours", "same"): 80.0,  # only the quick run has it
        ("sealed", "per-image"): 94.5,
    }
    assert all(str(p) in reason for p in (quick, table, sealed))
    assert read_headline_maps([])[0] == {}


def test_the_sealed_modes_best_attack_and_its_section():
    from pecbir.security import _sealed_markdown, best_sealed_attack

    def scores(slice_ssim):
        summary = {"median": slice_ssim, "mean": slice_ssim, "worst": slice_ssim, "min": 0.0}
        return {
            "roi": {"ssim": summary, "psnr": summary},
            "slice": {"ssim": summary, "psnr": summary},
        }

    sealed = {
        "attacks": {"nearest template": scores(0.4), "ridge": scores(0.6)},
        "membership": {
            "n_member_probes": 10,
            "n_outsider_probes": 20,
            "auc": 0.75,
            "tpr_at_1pct_fpr": 0.1,
            "reidentification_top1": 0.5,
            "chance_top1": 0.01,
            "exact_copy_distance": 0.0,
        },
        "setting": {
            "dictionary_size": 64,
            "fv_dim": 13312,
            "pca_dim": 13,
            "n_stored": 100,
            "collection_folds": [4, 5],
            "n_public": 50,
            "public_folds": [1, 2],
            "outsider_folds": [3],
            "n_victims": 8,
            "seed": 0,
            "crop_size": 64,
        },
    }
    assert best_sealed_attack(sealed)[0] == "ridge"
    text = "\n".join(_sealed_markdown(sealed, "sealed_inversion.png"))
    assert "| ridge | 0.600 |" in text and "AUC 0.750" in text and "sealed_inversion.png" in text


def _minimal_report() -> dict:
    """A report.json as `run_report` writes it, one scheme and one attack per key mode."""

    def attack(ssim):
        return {
            "threat": "ciphertext-only",
            "ssim": {"mean": ssim, "std": 0.0},
            "psnr": {"mean": 20.0, "std": 0.0},
        }

    by_mode = {
        "same": {"median 3×3": attack(0.3)},
        "per-image": {"median 3×3": attack(0.2)},
    }
    statistics = {
        "plain": {"entropy": 7.0},
        "ours": {"entropy": 7.9},
        "key_streams": {},
        "uniform_reference": {"npcr": 99.6, "uaci": 33.5},
    }
    return {
        "config": {"seed": 0, "n_mask_images": 2, "kpa_pairs": 1, "n_kpa_images": 1},
        "data": {"eval_ids": ["a", "b"], "dataset": "test", "natural_image": "camera"},
        "seconds": 1.0,
        "attacks_dataset": {"ours": by_mode},
        "attacks_natural": {"ours": by_mode},
        "statistics_dataset": statistics,
        "statistics_natural": dict(statistics),
        "figures": {"heatmap_same": "a.png", "heatmap_per-image": "b.png"},
        "frontier": [],
        "retrieval_source": "none",
        "plain_map": None,
    }


def test_refresh_rereads_the_maps_into_a_written_report_without_attacking(tmp_path):
    from pecbir.security import ReportConfig, refresh_report

    old = _minimal_report()  # as written before the renames: "25", "different"
    for key in ("attacks_dataset", "attacks_natural"):
        old[key] = {
            "25": {"same": old[key]["ours"]["same"], "different": old[key]["ours"]["per-image"]}
        }
    for key in ("statistics_dataset", "statistics_natural"):
        old[key]["25"] = old[key].pop("ours")
    old["figures"] = {"heatmap_same": "a.png", "heatmap_different": "b.png", "frontier": "f.png"}
    (tmp_path / "report.json").write_text(json.dumps(old))
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            {
                "config": {"headline_dim": 10, "folds": [1, 2, 3, 4, 5]},
                "summary": {
                    "non-secure": {"64": {"10": {"mAP": {"mean": 94.67}}}},
                    "np/per-image": {"64": {"10": {"mAP": {"mean": 84.52}}}},
                },
            }
        )
    )
    config = ReportConfig(out_dir=tmp_path, experiment_results=(results,), sealed=False)
    document = refresh_report(config)
    points = {(p["scheme"], p["mode"]): p for p in document["frontier"]}
    assert points["np", "per-image"]["map"] == 84.52 and points["np", "same"]["map"] is None
    assert points["np", "per-image"]["best_ssim"] == 0.2  # the report's attacks, untouched
    assert document["figures"]["heatmap_per-image"] == "b.png"
    text = (tmp_path / "report.md").read_text()
    assert "Non-secure (plain) mAP: 94.67 %" in text and "| np | per-image | 84.52 |" in text
    assert json.loads((tmp_path / "report.json").read_text())["frontier"] == document["frontier"]
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_pe_roi_points_and_section_come_from_the_jigsaw_report():
    from pecbir.security import _jigsaw_markdown, pe_roi_frontier

    def stage(full, roi, **extra):
        entry = {"ssim_full": full, "psnr_full": full, "ssim_roi": roi, **extra}
        return {k: {"median": v, "worst": v + 0.1, "mean": v} for k, v in entry.items()}

    summary = {
        "ours": {"pixel": stage(0.9, 0.88), "all-black guess": stage(0.4, 0.0)},
        "pe-roi-t16d": {
            "pixel": stage(0.45, 0.02),
            "jigsaw": stage(0.43, 0.2, neighbour_accuracy=0.1, direct_accuracy=0.05),
            "oracle": stage(0.5, 0.85),  # a bound, not an attack
            "all-black guess": stage(0.4, 0.0),
        },
    }
    points = pe_roi_frontier({"summary": summary}, {("pe-roi-t16d", "per-image"): 87.0})
    assert len(points) == 1
    (point,) = points
    assert point["best_attack"] == "pixel" and point["best_ssim"] == 0.45
    assert point["best_attack_roi"] == "jigsaw" and point["best_ssim_roi"] == 0.2
    assert point["map"] == 87.0 and point["all_black_ssim"] == 0.4
    text = "\n".join(_jigsaw_markdown({"source": "x", **summary}))
    assert "| pe-roi-t16d | pixel | 0.45 / 0.55 | jigsaw | 0.20 / 0.30 | 0.10 / 0.20 |" in text
    assert "| ours | pixel | 0.90 / 1.00 |" in text


def test_no_cipher_baselines_and_each_attack_s_advantage_over_guessing():
    from types import SimpleNamespace

    from pecbir.commands.jigsaw_report import advantage_over_guessing, no_cipher_baselines

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 32, 32), dtype=np.uint8)
    masks = np.zeros((5, 32, 32), dtype=bool)
    masks[:, 12:20, 12:20] = True
    data = SimpleNamespace(images=images, masks=masks, labels=np.ones(5), index=np.arange(5) + 100)
    baselines = no_cipher_baselines(data, [1, 3])
    assert baselines["n_mean_slices"] == 3 and len(baselines["per_slice"]) == 2
    assert baselines["per_slice"][1]["id"] == {"row": 3, "index": 103}
    # the all-black guess of a slice scores what score_regions gives it
    from pecore.jigsaw import score_regions

    black = score_regions(images[1], np.zeros_like(images[1]), masks[1])
    assert baselines["per_slice"][0]["all-black guess"] == black
    per_slice = [
        {
            g: {"ssim_full": 0.2, "ssim_roi": 0.1 * (i + 1)}
            for g in ("all-black guess", "mean-image guess")
        }
        for i in range(2)
    ]
    document = {
        "no_cipher": {"per_slice": per_slice},
        "per_slice": {
            "x": [
                {
                    "pixel": {"ssim_full": 0.5, "ssim_roi": 0.3},
                    "oracle": {"ssim_full": 1, "ssim_roi": 1},
                },
                {
                    "pixel": {"ssim_full": 0.1, "ssim_roi": 0.1},
                    "jigsaw": {"ssim_full": 0.3, "ssim_roi": 0.4},
                },
            ]
        },
    }
    advantage = advantage_over_guessing(document)["x"]
    assert advantage["ssim_full"]["worst"] == pytest.approx(0.3)
    assert advantage["ssim_roi"]["median"] == pytest.approx(0.2)  # 0.3 - 0.1 and 0.4 - 0.2


def test_an_interior_pe_roi_is_attacked_as_its_base_and_shows_the_no_cipher_guesses():
    from pecbir.security import _no_cipher_markdown, jigsaw_no_cipher, pe_roi_frontier

    interior, base = "pe-roi-t16dn-in", "pe-roi-t16dn"
    entry = {"median": 0.1, "worst": 0.2, "mean": 0.1}
    stages = {
        "pixel": {"ssim_full": entry, "psnr_full": entry, "ssim_roi": entry},
        "all-black guess": {"ssim_full": entry, "psnr_full": entry, "ssim_roi": entry},
    }
    points = pe_roi_frontier(
        {"summary": {base: stages}},
        {(base, "per-image"): 80.0, (interior, "per-image"): 81.0},
    )
    assert {p["scheme"]: p["map"] for p in points} == {base: 80.0, interior: 81.0}
    assert points[-1]["best_attack"] == f"pixel (as {base})"
    assert jigsaw_no_cipher({"summary": {}}) is None
    gap = {"median": -0.3, "worst": 0.05, "mean": -0.2}
    baseline = jigsaw_no_cipher(
        {
            "no_cipher": {"summary": {"mean-image guess": stages["pixel"]}, "n_mean_slices": 9},
            "advantage_over_guessing": {base: {"ssim_full": gap, "ssim_roi": gap}},
        }
    )
    text = "\n".join(_no_cipher_markdown(baseline))
    assert "| mean-image guess | 0.10 / 0.20 | 0.10 / 0.20 |" in text
    assert f"| {base} | -0.30 / +0.05 | -0.30 / +0.05 |" in text
