"""`pecbir keygen`: create an owner's master key file (0600, never printed)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "keygen",
        help="create a master key file (0600)",
        description="Create an owner's master key. The secret is written to the file only.",
    )
    parser.add_argument("--out", type=Path, default=Path("master.key"), help="key file to create")
    parser.add_argument("--force", action="store_true", help="overwrite an existing key file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pecore.keys import MasterKey

    key = MasterKey.generate()
    path = key.save(args.out, overwrite=args.force)
    print(f"wrote master key {key.key_id} to {path} (mode 0600)")
    return 0
