"""`pecbir`: the one command-line entry point for users and operators.

Each sub-command lives in its own module under `pecbir.commands` and exposes
`register(subparsers)`; modules are discovered automatically so that adding a command
never touches this file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from pecbir import commands
from pecbir_platform.config import show_defaults, version


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, when `command` is registered by the module of its
    name (dashes as underscores: ``bench-index`` → ``pecbir.commands.bench_index``), of that
    command alone: only that module's imports are then needed, so a benchmark runs on a GPU
    machine that has the science libraries but not the services' (FastAPI, Celery, …)."""
    names = sorted(module.name for module in pkgutil.iter_modules(commands.__path__))
    wanted = command.replace("-", "_") if command else None
    if wanted in names:
        parser, subparsers = _parser([wanted])
        if command in subparsers.choices:
            return parser
    return _parser(names)[0]


def _parser(modules: list[str]) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="pecbir",
        description="Privacy-preserving CBIR of brain-tumour MRI on perceptually encrypted images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=version("pecbir"))
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(f"{commands.__name__}.{name}").register(subparsers)
    show_defaults(parser)
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"pecbir {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
