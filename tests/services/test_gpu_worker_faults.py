"""The GPU worker's batch path with real processes: a re-index fanned out as batches to
pecbir.reindex.gpu, and a worker killed mid-batch, whose batch is redelivered (late acks) and
indexes every image exactly once — the guarantee the CPU worker's fault test checks.

The worker computes with the torch back end on the CPU (CI has no GPU), or numpy without torch.
"""

from __future__ import annotations

import importlib.util

import httpx
import pytest

from tests.services.test_faults import MODEL, _files, _model, _poll, _store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
BACKEND = "torch" if importlib.util.find_spec("torch") else "numpy"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from pecbir_harness.procs import Cluster

    tmp = tmp_path_factory.mktemp("gpu-faults")
    delay = tmp / "index-delay"
    with Cluster(
        tmp,
        encryptor=False,
        own_redis=True,
        extra_env={
            "PECBIR_VISIBILITY_TIMEOUT_S": "4",
            "PECBIR_TEST_INDEX_DELAY_FILE": str(delay),
            "PECBIR_REINDEX_GPU_BATCH": "5",
            "PECBIR_FEATURE_BACKEND": BACKEND,
            "PECBIR_FEATURE_DEVICE": "cpu",
        },
    ) as running:
        running.delay_file = delay
        running.gateway = httpx.Client(
            base_url=running.gateway_url,
            headers={"authorization": f"Bearer {running.token()}"},
            timeout=30,
        )
        running.uploaded = []
        for seed in range(12):
            answer = running.gateway.post("/v1/collections/brain/images", files=_files(seed))
            assert answer.status_code == 202, answer.text
            running.uploaded.append(answer.json()["image_id"])
        yield running


def _features(cluster, version: str) -> list[str]:
    from pecbir_contracts.layout import CollectionLayout

    layout = CollectionLayout(cluster.tenant, "brain")
    keys = _store(cluster).list(layout.features_prefix(version))
    return [layout.image_id_of_features(version, k) for k in keys]


def _train(cluster) -> str:
    answer = cluster.gateway.post("/v1/collections/brain/model/train", json=MODEL)
    assert answer.status_code == 202, answer.text
    return answer.json()["version"]


def test_reindex_runs_as_gpu_batches_and_a_killed_batch_is_redone_exactly_once(cluster):
    first = _train(cluster)
    _poll(lambda: len(_features(cluster, first)) == 12, "first version indexed", timeout=150)
    log = cluster.logs / "worker.log"
    assert "pecbir.index.batch" in log.read_text()  # the re-index went through batches
    cluster.delay_file.write_text("30")
    try:
        second = _train(cluster)
        _poll(lambda: "test hook: index_batch sleeps" in log.read_text(), "batch started", 150)
        assert len(_features(cluster, second)) < 12
        # the model status shows the stalled re-index: its plan's total, what is done
        progress = _model(cluster)["reindex"]
        assert (progress["version"], progress["total"]) == (second, 12)
        assert progress["done"] < 12
        cluster.kill_worker()
    finally:
        cluster.delay_file.unlink()
    cluster.start_worker()
    _poll(lambda: len(_features(cluster, second)) == 12, "killed batch redone", timeout=150)
    features = _features(cluster, second)
    assert sorted(features) == sorted(cluster.uploaded) and len(set(features)) == 12
    _poll(
        lambda: _model(cluster)["serving_version"] == second and _model(cluster)["n_vectors"] == 12,
        "search serves the new version",
    )
    final = _model(cluster)["reindex"]
    assert (final["version"], final["done"], final["total"]) == (second, 12, 12)
    assert final["eta_seconds"] == 0 and final["images_per_s"] > 0
