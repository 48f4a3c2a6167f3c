"""Expiry of the pending store (issue 14): a half of an image <-> SEG pair whose other half
does not come within the time to live is removed by the encryptor's sweep (logged, audited,
counted), a re-sent half starts its clock again, and what waits is visible (/healthz details,
/metrics, the janitor's status)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from pecbir_encryptor.janitor import PendingJanitor
from pecbir_harness.embedded import EmbeddedSystem
from pecore.keys import MasterKey
from tests.services.helpers import dicom_bytes, make_seg, mr_with_seg, multipart_related

DAY = 86400.0


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with EmbeddedSystem(tmp_path_factory.mktemp("expiry"), master=MasterKey.from_seed(17)) as s:
        yield s


def _stow(system, datasets) -> dict:
    body, content_type = multipart_related([dicom_bytes(d) for d in datasets])
    answer = system.encryptor.post(
        "/dicomweb/expiry/studies", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code in (200, 202), answer.text
    return answer.json()


def _pair(seed: int):
    return mr_with_seg(300 + seed)[:2]


def _waiting(system, kind: str) -> list:
    folder = system.root / "pending" / "expiry"
    return sorted(folder.glob(f"{kind}-*.sealed")) if folder.exists() else []


def _age(path, days: float) -> None:
    past = time.time() - days * DAY
    os.utime(path, (past, past))


def _expired_count(kind: str) -> float:
    return REGISTRY.get_sample_value("pecbir_encryptor_pending_expired_total", {"kind": kind}) or 0


def test_halves_older_than_the_ttl_expire_and_younger_ones_stay(system):
    encryptor = system.encryptor_app.state.encryptor
    old_image, _ = _pair(1)
    young_image, _ = _pair(2)
    _, lonely_seg = _pair(3)
    _stow(system, [old_image])
    old_file = _waiting(system, "image")[0]
    _stow(system, [young_image])
    _stow(system, [lonely_seg])  # its image never comes
    assert len(_waiting(system, "image")) == 2 and len(_waiting(system, "mask")) == 1
    _age(old_file, 40)
    _age(_waiting(system, "mask")[0], 31)
    before = {kind: _expired_count(kind) for kind in ("image", "mask")}
    janitor = PendingJanitor(encryptor, ttl_s=30 * DAY, interval_s=3600)
    expired = janitor.sweep()
    assert sorted(e.kind for e in expired) == ["image", "mask"]
    assert all(e.collection == "expiry" and e.age_s > 30 * DAY for e in expired)
    # The young image still waits; the old one and the lonely SEG's mask are gone.
    assert [p.name for p in _waiting(system, "image")] != [old_file.name]
    assert len(_waiting(system, "image")) == 1 and not _waiting(system, "mask")
    assert _expired_count("image") == before["image"] + 1
    assert _expired_count("mask") == before["mask"] + 1
    audit = [
        json.loads(line)
        for line in (system.root / "encryptor-audit.jsonl").read_text().splitlines()
    ]
    records = [r for r in audit if r.get("action") == "pending-expired"]
    assert {r["kind"] for r in records[-2:]} == {"image", "mask"}
    # No DICOM UID anywhere in what the sweep wrote: only the keyed pseudonym.
    assert str(old_image.SOPInstanceUID) not in json.dumps(records)
    status = janitor.status()
    assert status["ttl_s"] == 30 * DAY and status["last_sweep"] is not None
    assert status["collections"]["expiry"]["image"]["waiting"] == 1
    assert status["collections"]["expiry"]["mask"]["waiting"] == 0
    # The SEG of the expired image, coming late: it waits like a new half (nothing paired).
    answer = _stow(system, [make_seg(np.ones((48, 48), bool), old_image)])
    assert "00081199" in answer  # stored with a warning: waiting for its image


def test_a_re_sent_half_starts_its_clock_again(system):
    encryptor = system.encryptor_app.state.encryptor
    image, _ = _pair(4)
    before = set(_waiting(system, "image"))
    _stow(system, [image])
    mine = sorted(set(_waiting(system, "image")) - before)
    assert len(mine) == 1
    _age(mine[0], 40)
    _stow(system, [image])  # the PACS sends the study again
    expired = PendingJanitor(encryptor, ttl_s=30 * DAY, interval_s=3600).sweep()
    assert mine[0].name not in {f"image-{e.key}.sealed" for e in expired}
    assert mine[0].exists()


def test_no_ttl_means_nothing_expires(system):
    encryptor = system.encryptor_app.state.encryptor
    for path in _waiting(system, "image"):
        _age(path, 400)
    assert PendingJanitor(encryptor, ttl_s=None, interval_s=3600).sweep() == []
    assert _waiting(system, "image")


def test_what_waits_is_on_healthz_and_metrics_for_the_service_only(system):
    PendingJanitor(system.encryptor_app.state.encryptor, ttl_s=None, interval_s=3600).sweep()
    details = system.encryptor.get("/healthz").json()
    waiting = details["pending"]["collections"]["expiry"]["image"]["waiting"]
    assert waiting == len(_waiting(system, "image")) > 0
    assert details["pending"]["ttl_s"] == 90 * DAY  # the default
    anonymous = system.encryptor.get("/healthz", headers={"authorization": ""})
    assert "pending" not in anonymous.json()
    metrics = system.encryptor.get("/metrics").text
    assert 'pecbir_encryptor_pending_waiting{collection="expiry",kind="image"}' in metrics
    assert "pecbir_encryptor_pending_oldest_seconds" in metrics


def test_a_bad_ttl_stops_the_service_naming_the_variable(tmp_path):
    code = (
        "from pecbir_platform.config import settings_from_env\n"
        "from pecbir_encryptor.settings import EncryptorSettings\n"
        "settings_from_env(EncryptorSettings)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PECBIR_ENCRYPTOR_TENANT": "hospital-a",
        "PECBIR_ENCRYPTOR_MASTER_KEY": str(tmp_path / "master.key"),
        "PECBIR_ENCRYPTOR_GATEWAY_TOKEN": "x",
        "PECBIR_ENCRYPTOR_USER_TOKEN_SECRET": "y",
        "PECBIR_ENCRYPTOR_PENDING_TTL_S": "0",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "PECBIR_ENCRYPTOR_PENDING_TTL_S" in done.stderr.strip().splitlines()[0]


def test_the_running_app_sweeps_by_itself(system):
    from fastapi.testclient import TestClient

    from pecbir_encryptor.app import create_app

    image, _ = _pair(5)
    before = set(_waiting(system, "image"))
    _stow(system, [image])
    (mine,) = set(_waiting(system, "image")) - before
    _age(mine, 40)
    settings = system.encryptor_app.state.context.settings.model_copy(
        update={"pending_ttl_s": 30 * DAY, "pending_sweep_interval_s": 0.2}
    )
    app = create_app(settings, master=system.master, gateway_client=TestClient(system.gateway_app))
    with TestClient(app):  # started: its housekeeping task sweeps every 0.2 s
        deadline = time.monotonic() + 30
        while mine.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not mine.exists()


def test_the_cli_prints_what_waits_and_sweeps(system, tmp_path, monkeypatch, capsys):
    from pecbir_encryptor.cli import main

    key = system.master.save(tmp_path / "master.key")
    for name, value in {
        "TENANT": system.tenant,
        "MASTER_KEY": str(key),
        "GATEWAY_TOKEN": system.cloud_token(),
        "USER_TOKEN_SECRET": system.user_secret.hex(),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "PENDING_DIR": str(system.root / "pending"),
        "PENDING_TTL_S": str(30 * DAY),
    }.items():
        monkeypatch.setenv(f"PECBIR_ENCRYPTOR_{name}", value)
    _stow(system, [_pair(6)[0]])
    waiting = _waiting(system, "image")
    assert main(["pending"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["collections"]["expiry"]["image"]["waiting"] == len(waiting) > 0
    for path in waiting:
        _age(path, 40)
    assert main(["pending", "--sweep"]) == 0
    out = capsys.readouterr().out
    assert out.count("expired expiry image") == len(waiting)
    assert not _waiting(system, "image")
