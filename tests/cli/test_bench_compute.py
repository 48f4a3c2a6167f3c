"""`pecbir bench-gpu` and `pecbir bench-training` run end to end on tiny inputs and write the
JSON their results/gpu/ files are made of (figures are measured there, never asserted here)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from pecbir.cli import main


def test_bench_gpu_writes_parity_and_speed(tmp_path):
    pytest.importorskip("torch", reason="the [gpu] extra (torch) is not installed")
    out = tmp_path / "bench.json"
    argv = ["bench-gpu", "--synthetic", "30", "--sizes", "2", "--n-train-patches", "3000"]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert report["device"] == "cpu" and row["dictionary_size"] == 2
    assert 0 <= row["top10_identical_fraction"] <= 1 and row["fv_max_abs_error"] >= 0
    assert row["numpy_images_per_s"] > 0 and row["torch_images_per_s"] > 0


def test_bench_training_measures_both_paths_and_reports_a_limit(tmp_path):
    out = tmp_path / "training.json"
    argv = ["bench-training", "--sizes", "60", "--features", "300", "--chunk", "25"]
    # a limit far below what a Python process with numpy needs: both runs must fail, visibly
    assert main([*argv, "--limit-gib", "0.05", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["memory", "streamed"]
    assert all(r["outcome"] != "fitted" for r in rows)
    argv += ["--modes", "memory,streamed,capped,primal", "--max-rank", "20"]
    assert main([*argv, "--limit-gib", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["memory", "streamed", "capped", "primal"]
    assert all(r["outcome"] == "fitted" and r["peak_rss_bytes"] > 0 for r in rows)
    if importlib.util.find_spec("torch") is not None:  # float32 primal on a device, 60 < F
        device = ["--modes", "primal", "--device", "cpu", "--limit-gib", "0"]
        assert main([*argv, *device, "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())["rows"]
        assert row["outcome"] == "fitted"  # its LOBPCG multiplies in float64
        # LOBPCG stopped by its cap gives pairs that are not eigenpairs yet: said, not hidden
        assert main([*argv, *device, "--max-iter", "2", "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())["rows"]
        assert row["outcome"] == "unconverged" and "in 2 iterations" in row["reason"]
        assert len(row["eigenvalues"]) == len(row["eigen_residuals"]) > 0
        assert main([*argv, *device, "--dtype", "float64", "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        (row,) = report["rows"]
        assert report["dtype"] == "float64" and row["outcome"] == "fitted"
        assert row["model_bytes"] == (2 * 300 * 300 + 25 * 300) * 8


@pytest.mark.parametrize("discard", [False, True])
def test_bench_index_runs_the_indexers_own_tasks_end_to_end(tmp_path, discard):
    pytest.importorskip("torch", reason="the [gpu] extra (torch) is not installed")
    crops, out = tmp_path / "crops.npz", tmp_path / "index.json"
    assert main(["bench-gpu", "--synthetic", "24", "--export-crops", str(crops)]) == 0
    argv = ["bench-index", "--crops", str(crops), "--size", "2", "--train-images", "24"]
    argv += ["--n-train-patches", "2000", "--images", "6,10", "--feature-images", "4"]
    argv += ["--distinct", "4", "--cpu-images", "3", "--batch-size", "4", "--device", "cpu"]
    argv += ["--feature-threads", "1,2"]
    # discarding: also by two worker processes; writing: also the device's stage profile and
    # the feature step by two processes
    argv += (
        ["--discard-features", "--processes", "1,2"]
        if discard
        else ["--stages", "--feature-processes", "2"]
    )
    assert main([*argv, "--store", str(tmp_path / "store"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    # every id indexed once, hard-linked ids included; records written or counted, not both
    rows = [(r["images"], r["processes"], r["indexed"]) for r in report["whole_task"]]
    assert all(r["load_ms_per_image_per_thread"] > 0 for r in report["whole_task"])
    if discard:
        assert rows == [(6, 1, 6), (6, 2, 6), (10, 1, 10), (10, 2, 10)]
        # the worker processes' discarded records count too (they were 0 before session 11)
        pooled = [r for r in report["whole_task"] if r["processes"] > 1]
        assert all(r["feature_record_bytes_discarded"] > 0 for r in pooled)
    else:
        assert rows == [(6, 1, 6), (10, 1, 10)]
        stages = report["device_stages_ms_per_image"]
        assert {"upload", "roi_pixels", "patches_pca", "fisher"} <= set(stages)
        assert all(v > 0 for v in stages.values())
    rates = report["feature_step_images_per_s"]["torch_by_batches_in_flight"]
    assert set(rates) == {"1", "2"} and all(r > 0 for r in rates.values())
    by_processes = report["feature_step_images_per_s"]["torch_by_processes_two_batches_each"]
    assert (
        (set(by_processes) == {"2"} and by_processes["2"] > 0) if not discard else not by_processes
    )
    features = list((tmp_path / "store").rglob("features/*/*.npz"))
    assert (report["feature_record_bytes_discarded"] > 0) == discard
    # the CPU reference (a warm-up image + 3 timed) always writes its records
    assert len(features) == (4 if discard else 6 + 10 + 4)
    assert report["cpu_whole_task_one_process"]["images"] == 3
