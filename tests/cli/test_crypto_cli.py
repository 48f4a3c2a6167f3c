"""`pecbir keygen`, `pecbir encrypt`, `pecbir decrypt` on PNG, NPY and DICOM."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from pecbir.cli import main
from pecbir_harness.dicom import save_mr
from pecore.cipher import to_uint8
from pecore.io import read_image, write_image


@pytest.fixture
def master_key(tmp_path):
    path = tmp_path / "owner.key"
    assert main(["keygen", "--out", str(path)]) == 0
    return path


def test_keygen_writes_0600_and_never_prints_secret(tmp_path, capsys):
    path = tmp_path / "k.key"
    assert main(["keygen", "--out", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = json.loads(path.read_text())["secret"]
    assert secret not in capsys.readouterr().out
    assert main(["keygen", "--out", str(path)]) == 2  # refuses to overwrite
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["ours", "25", "26", "27"])
@pytest.mark.parametrize("key_mode", ["same", "per-image"])
def test_encrypt_decrypt_round_trip_all_formats(tmp_path, master_key, scheme, key_mode):
    rng = np.random.default_rng(0)
    sources = {
        "a.png": rng.integers(0, 256, (20, 24), dtype=np.uint8),
        "b.npy": rng.integers(-500, 3000, (17, 13), dtype=np.int16),
        "c.dcm": rng.integers(0, 4096, (32, 32), dtype=np.uint16),
    }
    paths = []
    for name, pixels in sources.items():
        if name.endswith(".dcm"):
            paths.append(save_mr(tmp_path / name, pixels, bits_stored=12))
        else:
            paths.append(write_image(tmp_path / name, pixels))
    cipher_dir, plain_dir = tmp_path / "cipher", tmp_path / "plain"
    args = ["--key", str(master_key), "--scheme", scheme, "--key-mode", key_mode]
    assert main(["encrypt", *map(str, paths), "--out", str(cipher_dir), *args]) == 0
    ciphers = sorted(cipher_dir.glob("*.png"))
    assert len(ciphers) == 3
    for sidecar in cipher_dir.glob("*.json"):
        text = sidecar.read_text()
        assert "Doe" not in text and "PID-0001" not in text and "Hospital" not in text
        assert json.loads(text)["scheme"] == scheme
    for cipher in ciphers:
        assert b"Doe" not in cipher.read_bytes() and b"PID-0001" not in cipher.read_bytes()
    assert main(["decrypt", *map(str, ciphers), "--out", str(plain_dir), "--key", str(master_key),
                 "--restore"]) == 0  # fmt: skip
    decrypted = {tuple(read_image(p).shape): read_image(p) for p in plain_dir.glob("*.png")}
    for pixels in sources.values():
        assert np.array_equal(decrypted[pixels.shape], to_uint8(pixels)[0])


def test_decrypt_with_another_key_is_refused(tmp_path, master_key, capsys):
    image = write_image(tmp_path / "x.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert main(["encrypt", str(image), "--key", str(master_key), "--out", str(tmp_path / "c"),
                 "--id", "x1"]) == 0  # fmt: skip
    other = tmp_path / "other.key"
    main(["keygen", "--out", str(other)])
    code = main(["decrypt", str(tmp_path / "c" / "x1.png"), "--key", str(other), "--out",
                 str(tmp_path / "p")])  # fmt: skip
    assert code == 2
    assert "encrypted under master key" in capsys.readouterr().err
    assert not (tmp_path / "p" / "x1.png").exists()


def test_bad_input_gives_clear_error(tmp_path, master_key, capsys):
    bogus = tmp_path / "bogus.png"
    bogus.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["encrypt", str(bogus), "--key", str(master_key), "--out", str(tmp_path)]) == 2
    assert "not a readable PNG" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("pecbir", path=os.path.dirname(sys.executable))
    assert exe, "the pecbir console script is not installed next to this interpreter"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for command in ("keygen", "encrypt", "decrypt", "bench"):
        assert command in result.stdout
