"""The security report's reader of experiment results (no dataset needed)."""

from __future__ import annotations

import json

from pecbir.security import best_ciphertext_only, read_headline_map


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


def test_pe_roi_points_and_section_come_from_the_jigsaw_report():
    from pecbir.security import _jigsaw_markdown, pe_roi_frontier

    def stage(full, roi, **extra):
        entry = {"ssim_full": full, "psnr_full": full, "ssim_roi": roi, **extra}
        return {k: {"median": v, "worst": v + 0.1, "mean": v} for k, v in entry.items()}

    summary = {
        "ours": {"pixel": stage(0.9, 0.88), "all-black guess": stage(0.4, 0.0)},
        "pe-roi": {
            "pixel": stage(0.45, 0.02),
            "jigsaw": stage(0.43, 0.2, neighbour_accuracy=0.1, direct_accuracy=0.05),
            "oracle": stage(0.5, 0.85),  # a bound, not an attack
            "all-black guess": stage(0.4, 0.0),
        },
    }
    points = pe_roi_frontier({"summary": summary}, {("pe-roi", "per-image"): 87.0})
    assert len(points) == 1
    (point,) = points
    assert point["best_attack"] == "pixel" and point["best_ssim"] == 0.45
    assert point["best_attack_roi"] == "jigsaw" and point["best_ssim_roi"] == 0.2
    assert point["map"] == 87.0 and point["all_black_ssim"] == 0.4
    text = "\n".join(_jigsaw_markdown({"source": "x", **summary}))
    assert "| pe-roi | pixel | 0.45 / 0.55 | jigsaw | 0.20 / 0.30 | 0.10 / 0.20 |" in text
    assert "| ours | pixel | 0.90 / 1.00 |" in text
