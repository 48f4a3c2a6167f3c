"""`pecbir bench-gpu` and `pecbir bench-training` run end to end on tiny inputs and write the
JSON their results/gpu/ files are made of (figures are measured there, never asserted here)."""

from __future__ import annotations

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
    assert main([*argv, "--limit-gib", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(r["outcome"] == "fitted" and r["peak_rss_bytes"] > 0 for r in rows)
