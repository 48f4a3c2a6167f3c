"""The command lines explain themselves (issue 11): defaults in every --help, --version, the
environment `pecbir serve` needs, one line (no traceback) for a bad setting or an unreachable
gateway."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

from pecbir.cli import build_parser
from pecbir.commands.serve import REQUIRED
from pecbir_harness.procs import free_port
from pecbir_harness.services import SERVICES


def _parsers(parser: argparse.ArgumentParser, name: str):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _encryptor_parser() -> argparse.ArgumentParser:
    from pecbir_encryptor import cli

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit):
            cli.main([])
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    return captured["parser"]


@pytest.mark.parametrize("root", ["pecbir", "pecbir-encryptor"])
def test_every_help_shows_every_default(root):
    parser = build_parser() if root == "pecbir" else _encryptor_parser()
    checked = 0
    for name, sub in _parsers(parser, root):
        sub.format_help()  # every %(default)s expands
        for action in sub._actions:
            if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
                continue
            shown = "default" in (action.help or "").lower()
            assert shown, f"{name} {action.option_strings[-1]}: no default in --help"
            checked += 1
    assert checked >= 2


def test_version():
    done = subprocess.run(
        [sys.executable, "-m", "pecbir.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("pecbir ")


def test_serve_help_lists_the_required_environment_and_its_absence_is_one_line(tmp_path):
    text = build_parser().parse_known_args(["serve"])[0]  # parses: the sub-command exists
    assert text.command == "serve"
    serve = dict(_parsers(build_parser(), "pecbir"))["pecbir serve"]
    assert all(name in serve.format_help() for name in REQUIRED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PECBIR_")}
    done = subprocess.run(
        [sys.executable, "-m", "pecbir.cli", "serve"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and all(name in done.stderr for name in REQUIRED)


def test_a_service_with_a_bad_setting_stops_with_one_line_naming_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PECBIR_")}
    env |= {"PECBIR_STORE_URL": "file:///nonexistent-store", "PECBIR_PRESIGN_TTL_S": "many"}
    args = SERVICES["gateway"].command(port=free_port(), bin_dir=None)
    args[0] = os.path.join(os.path.dirname(sys.executable), "uvicorn")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "PECBIR_TOKEN_SECRET: not set" in line and "PECBIR_PRESIGN_TTL_S" in line


def test_an_unreachable_gateway_is_one_line(tmp_path):
    from pecore.keys import MasterKey

    MasterKey.generate().save(tmp_path / "master.key")
    image = tmp_path / "slice.npy"
    np.save(image, np.arange(48 * 48, dtype=np.uint16).reshape(48, 48))
    mask = tmp_path / "mask.npy"
    np.save(mask, np.pad(np.ones((16, 16), dtype=np.uint8), 16))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PECBIR_")}
    env |= {
        "PECBIR_ENCRYPTOR_TENANT": "hospital-a",
        "PECBIR_ENCRYPTOR_MASTER_KEY": str(tmp_path / "master.key"),
        "PECBIR_ENCRYPTOR_GATEWAY_URL": f"http://127.0.0.1:{free_port()}",
        "PECBIR_ENCRYPTOR_GATEWAY_TOKEN": "t",
        "PECBIR_ENCRYPTOR_USER_TOKEN_SECRET": "s",
        "PECBIR_ENCRYPTOR_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    args = [sys.executable, "-m", "pecbir_encryptor", "upload", str(image), str(mask)]
    done = subprocess.run(
        [*args, "--collection", "c"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "cannot reach the gateway" in done.stderr
    assert "PECBIR_ENCRYPTOR_GATEWAY_URL" in done.stderr


def test_a_command_named_after_its_module_imports_that_module_alone():
    """What lets a benchmark run on a GPU machine without the services' libraries; a command
    registered under another name (encrypt, in crypto.py) still parses, from all modules."""
    probe = (
        "import sys; from pecbir.cli import build_parser; "
        "build_parser('bench-training').parse_args(['bench-training']); "
        "print(sorted(m for m in sys.modules if m.startswith('pecbir.commands.'))); "
        "print('fastapi' in sys.modules, 'celery' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["['pecbir.commands.bench_training']", "False False"]
    args = build_parser("encrypt").parse_args(["encrypt", "x.png", "--key", "k", "--out", "o"])
    assert args.command == "encrypt"
