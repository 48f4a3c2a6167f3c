"""The soak run of issue 6, small: real processes, the same three properties as `pecbir soak`
(every acknowledged upload searchable, zero 5xx, memory flat), plus the judging functions on
made-up inputs so that each check is seen to fail when it should."""

from __future__ import annotations

import shutil

import pytest

from pecbir_harness.soak import (
    MiB,
    SoakConfig,
    checks,
    memory_report,
    run_soak,
    schedule,
    soak_cluster,
)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_small_soak_acknowledged_searchable_no_5xx_memory_flat(tmp_path, radosgw):
    from pecbir_harness.procs import S3Bucket

    cfg = SoakConfig(
        uploads=60,
        searches=150,
        seed_uploads=30,
        round_size=20,
        concurrency=4,
        sample_interval_s=0.2,
        drain_timeout_s=90,
        status_sample=20,
        progress=False,
    )
    own_redis = shutil.which("redis-server") is not None
    with soak_cluster(tmp_path, own_redis, S3Bucket.on(radosgw, "soak")) as cluster:
        results = run_soak(cluster, cfg)

    verify = results["verify"]
    # Every upload (seed and mixed) was acknowledged once; replays added no image.
    assert verify["acknowledged_ids"] == cfg.seed_uploads + cfg.uploads
    assert verify["n_missing"] == 0
    assert verify["search_n_vectors"] == verify["acknowledged_ids"]
    assert verify["gateway_not_searchable"] == []
    assert results["checks"]["acknowledged_searchable"]["ok"]

    assert all(not code.isdigit() or int(code) < 500 for code in results["status_counts"])
    assert "transport-error" not in results["status_counts"]
    assert results["checks"]["no_5xx"]["ok"]
    by_kind = results["status_by_kind"]
    assert by_kind["upload"] == {"202": cfg.uploads}
    assert by_kind["search"] == {"200": cfg.searches}
    assert by_kind["replay"] == {"202": round(cfg.replay_fraction * cfg.uploads)}
    assert by_kind["conflict"] == {"409": round(cfg.conflict_fraction * cfg.uploads)}
    assert results["checks"]["answers_as_expected"]["ok"], results["surprises"]

    memory = results["memory"]
    for role in ("gateway", "search", "worker", "ceph-osd"):
        assert memory[role]["samples"] > 0
    for role in ("gateway", "search", "worker"):
        assert memory[role]["flat"] is True, memory[role]
    assert results["checks"]["memory_flat"]["ok"]
    assert set(results["latency_by_phase"]) >= {"seed", "mixed-q1", "mixed-q4"}


def test_schedule_puts_replays_behind_and_conflicts_after_their_upload():
    cfg = SoakConfig(uploads=300, searches=500, round_size=25, replay_fraction=0.1)
    cfg.conflict_fraction = 0.05
    rounds = schedule(cfg, first=10, run="t")
    flat = [(r, i, op) for r, ops in enumerate(rounds) for i, op in enumerate(ops)]
    where = {op.key: (r, i) for r, i, op in flat if op.kind == "upload"}
    kinds = [op.kind for _, _, op in flat]
    assert kinds.count("upload") == 300 and kinds.count("search") == 500
    assert kinds.count("replay") == 30 and kinds.count("conflict") == 15
    assert len(where) == 300  # one key per upload
    for r, i, op in flat:
        if op.kind == "replay":
            assert (r, i) > where[op.key]
        if op.kind == "conflict":
            assert r > where[op.key][0] and op.body != op.item


def _samples(growth_mib: float) -> list[dict]:
    samples = []
    for n in range(100):
        phase = "seed" if n < 20 else "mixed-q1"
        rss = {"gateway": int((100 + growth_mib * n / 100) * MiB), "ceph-osd": (50 + n) * MiB}
        samples.append({"t": float(n), "phase": phase, "load1": 1.0, "rss": rss})
    return samples


def _results(memory: dict, statuses: dict[str, int]) -> dict:
    return {
        "memory": memory,
        "status_counts": statuses,
        "n_surprises": 0,
        "replays_answered": 0,
        "verify": {
            "drain_reached": True,
            "n_missing": 0,
            "search_n_vectors": 5,
            "acknowledged_ids": 5,
            "gateway_not_searchable": [],
            "held_by_search": 5,
            "gateway_status_sample": 5,
            "drain_s": 0.0,
        },
    }


def test_memory_check_fails_on_growth_and_ignores_the_store():
    cfg = SoakConfig()
    flat = memory_report(_samples(growth_mib=2.0), cfg)
    assert flat["gateway"]["flat"] is True
    assert flat["ceph-osd"]["checked"] is False  # grows by 50 MiB, holds the data
    leaking = memory_report(_samples(growth_mib=60.0), cfg)
    assert leaking["gateway"]["flat"] is False
    assert leaking["gateway"]["growth_mib"] == pytest.approx(24.0, abs=2.0)
    assert checks(_results(flat, {"200": 3}))["memory_flat"]["ok"]
    assert not checks(_results(leaking, {"200": 3}))["memory_flat"]["ok"]


def test_5xx_and_transport_errors_fail_the_check():
    memory = memory_report(_samples(0.0), SoakConfig())
    assert checks(_results(memory, {"200": 3, "202": 1}))["no_5xx"]["ok"]
    assert not checks(_results(memory, {"200": 3, "503": 1}))["no_5xx"]["ok"]
    assert not checks(_results(memory, {"200": 3, "transport-error": 1}))["no_5xx"]["ok"]
    verify_fail = _results(memory, {"200": 1})
    verify_fail["verify"]["n_missing"] = 1
    assert not checks(verify_fail)["acknowledged_searchable"]["ok"]
