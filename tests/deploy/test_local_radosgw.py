"""`deploy/local/radosgw`: start, stop and status are idempotent, the data outlives a stop, and
the printed environment reaches the store."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pecbir_harness.radosgw import missing_binaries
from tests.services.helpers import radosgw_unavailable

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "radosgw"

pytestmark = pytest.mark.integration


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=180)


def _env(output: str) -> dict[str, str]:
    exports = [line[len("export ") :] for line in output.splitlines() if line.startswith("export ")]
    return dict(line.split("=", 1) for line in exports)


def test_start_stop_status_are_idempotent_and_keep_the_data(tmp_path):
    if missing_binaries():
        radosgw_unavailable(f"no {', '.join(missing_binaries())} on PATH")
    folder = str(tmp_path / "rgw")
    try:
        first = _run("start", "--dir", folder)
        assert first.returncode == 0, first.stderr
        env = _env(first.stdout)
        assert set(env) == {
            "PECBIR_STORE_URL",
            "PECBIR_S3_ACCESS_KEY",
            "PECBIR_S3_SECRET_KEY",
            "PECBIR_S3_BUCKET",
        }
        again = _run("start", "--dir", folder)  # already running: same cluster, same keys
        assert again.returncode == 0 and _env(again.stdout) == env
        assert _run("status", "--dir", folder).returncode == 0

        from pecbir_platform.store import StoreSettings

        settings = StoreSettings(**{k[len("PECBIR_") :].lower(): v for k, v in env.items()})
        settings.open_store().put("kept.txt", b"still here")
        for _ in range(2):
            assert _run("stop", "--dir", folder).returncode == 0
        assert _run("status", "--dir", folder).returncode == 3
        assert _run("start", "--dir", folder).returncode == 0
        assert settings.open_store().get("kept.txt") == b"still here"
    finally:
        _run("destroy", "--dir", folder)
    assert not Path(folder).exists()
