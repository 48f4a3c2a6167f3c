"""Recovery from hard kills with real processes (issue 15): two workers, a private Redis
(append-only, fsync always), the session's radosgw as the store, gateway and search; one
seeded loop of uploads under overlapping faults of every kind (`pecbir_harness.recovery`):
kill -9 of a worker mid-task, mid-training and at random, of Redis, of the search service
(also while Redis is down), of the gateway mid-request and of the S3 gateway mid-request.

The visibility timeout stays at an hour: an index task lost with its worker comes back in
time only through the reconciler. After quiet: every acknowledged upload searchable, no
upload stored twice, no debris after the janitor, every service healthy. The latencies are
reported (`pecbir recovery` measures them over longer loops), not asserted.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def test_a_seeded_fault_loop_loses_nothing_duplicates_nothing_and_leaves_no_debris(
    tmp_path, radosgw
):
    from pecbir_harness.procs import Cluster, S3Bucket
    from pecbir_harness.recovery import FAULT_KINDS, RecoveryConfig, checks, recovery_env, run_loop

    cfg = RecoveryConfig(
        uploads=40,
        faults=len(FAULT_KINDS),
        seed=15,
        upload_threads=2,
        upload_pace_s=0.3,
        fault_gap_s=(0.5, 1.5),
        settle_timeout_s=150.0,
    )
    delay, train_delay = tmp_path / "index-delay", tmp_path / "train-delay"
    with Cluster(
        tmp_path,
        encryptor=False,
        own_redis=True,
        workers=2,
        start_timeout_s=180.0,
        s3=S3Bucket.on(radosgw, "recovery"),
        extra_env=recovery_env(cfg, delay, train_delay),
    ) as cluster:
        cluster.delay_file, cluster.train_delay_file = delay, train_delay
        report = run_loop(cluster, cfg, "brain")
    print(json.dumps(report, indent=1, default=str))
    assert sorted(f["kind"] for f in report["faults"]) == sorted(FAULT_KINDS)
    assert report["n_faults"] == len(FAULT_KINDS), report["faults"]
    assert report["acknowledged"] >= cfg.seed_uploads + cfg.uploads // 2
    failed = {name: check["detail"] for name, check in checks(report).items() if not check["ok"]}
    assert not failed, failed
