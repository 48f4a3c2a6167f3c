"""`pecbir serve --one-box`: the whole real stack on loopback from one command, its printed
URLs and tokens good for an upload, and nothing left running after Ctrl-C."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from pecbir_contracts.png import encode_png
from pecbir_harness.procs import free_port
from pecbir_harness.radosgw import RadosGateway, missing_binaries
from tests.services.helpers import radosgw_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no {pattern!r} in the output:\n{''.join(lines[-40:])}")


def test_one_box_serves_an_upload_with_the_printed_token_and_stops_clean(tmp_path):
    if missing_binaries():
        radosgw_unavailable(f"no {', '.join(missing_binaries())} on PATH")
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    ports = {name: free_port() for name in ("gateway", "search", "encryptor")}
    args = [sys.executable, "-m", "pecbir.cli", "serve", "--one-box", "--dir", str(tmp_path)]
    args += [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = _wait_for_line(proc, r"^Ctrl-C stops everything", timeout=150)
        printed = "".join(lines)
        user_token = re.search(r"export PECBIR_USER_TOKEN=(\S+)", printed).group(1)
        encryptor = f"http://127.0.0.1:{ports['encryptor']}"
        assert encryptor in printed and f"http://127.0.0.1:{ports['gateway']}" in printed
        image = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
        mask = np.zeros((48, 48), dtype=np.uint8)
        mask[12:30, 12:30] = 255
        answer = httpx.post(
            f"{encryptor}/v1/collections/brain/images",
            headers={"authorization": f"Bearer {user_token}"},
            files={"image": ("s.png", encode_png(image)), "mask": ("m.png", encode_png(mask))},
            data={"label": "1", "train": "true"},
            timeout=60,
        )
        assert answer.status_code == 202, answer.text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=90)
    assert proc.returncode == 0
    assert RadosGateway(tmp_path / "radosgw").running() == {
        "mon": False,
        "osd": False,
        "rgw": False,
    }
