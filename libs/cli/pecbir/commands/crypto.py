"""`pecbir encrypt` / `pecbir decrypt`: PNG, NPY and DICOM in; cipher PNG + JSON sidecar out.

The sidecar (`<id>.json`) holds the public `CipherMetadata` only, tagged with the owner's
HMAC over the cipher pixels and every metadata field; DICOM headers are never copied into the
output.  Decryption checks every input's tag (and the key check value) before it decrypts or
writes anything: one altered cipher image or sidecar and nothing is written.
"""

from __future__ import annotations

import argparse
import re
import uuid
from pathlib import Path

from pecore.cipher import SCHEMES

SIDECAR_SUFFIX = ".json"
# An --id names the output files and derives the image key: a plain name, nothing path-like.
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def register(subparsers: argparse._SubParsersAction) -> None:
    enc = subparsers.add_parser(
        "encrypt",
        help="encrypt images (PNG/NPY/DICOM) with a master key",
        description="Encrypt plain images into <out>/<id>.png (cipher) + <id>.json (metadata).",
    )
    enc.add_argument("inputs", nargs="+", type=Path, help="plain images (.png, .npy, DICOM)")
    enc.add_argument("--key", type=Path, required=True, help="master key file (pecbir keygen)")
    enc.add_argument("--out", type=Path, required=True, help="output directory")
    enc.add_argument(
        "--scheme",
        choices=[n for s in SCHEMES.values() for n in (s.name, *s.aliases)],
        default="ours",
        help="cipher scheme (aliases: the paper's citation numbers 25, 26, 27)",
    )
    enc.add_argument("--key-mode", choices=("same", "per-image"), default="per-image")
    enc.add_argument("--id", dest="image_id", help="opaque id (single input only; default random)")
    enc.set_defaults(func=run_encrypt)

    dec = subparsers.add_parser(
        "decrypt",
        help="decrypt cipher images made by `pecbir encrypt`",
        description="Decrypt cipher PNG/NPY images; metadata is read from the .json sidecar.",
    )
    dec.add_argument("inputs", nargs="+", type=Path, help="cipher images (.png or .npy)")
    dec.add_argument("--key", type=Path, required=True, help="master key file")
    dec.add_argument("--out", type=Path, required=True, help="output directory")
    dec.add_argument(
        "--restore",
        action="store_true",
        help="also write <id>.restored.npy with intensities mapped back by the stored 8-bit rule",
    )
    dec.set_defaults(func=run_decrypt)


def run_encrypt(args: argparse.Namespace) -> int:
    from pecore.envelope import seal, tag
    from pecore.io import read_image, write_image
    from pecore.keys import MasterKey

    if args.image_id and len(args.inputs) > 1:
        raise ValueError("--id can only be given with a single input")
    if args.image_id and not _IMAGE_ID.fullmatch(args.image_id):
        raise ValueError(
            f"--id {args.image_id!r}: use 1-128 letters, digits, '_' or '-', starting with a "
            "letter or digit (the id names files under --out and derives the image key)"
        )
    master = MasterKey.load(args.key)
    args.out.mkdir(parents=True, exist_ok=True)
    for source in args.inputs:
        image_id = args.image_id or uuid.uuid4().hex
        cipher, metadata = seal(read_image(source), master, image_id, args.scheme, args.key_mode)
        metadata = tag(cipher, metadata, master)
        write_image(args.out / f"{image_id}.png", cipher)
        (args.out / f"{image_id}{SIDECAR_SUFFIX}").write_text(metadata.model_dump_json(indent=2))
        print(f"{source} -> {args.out / image_id}.png")
    return 0


def run_decrypt(args: argparse.Namespace) -> int:
    import numpy as np

    from pecore.envelope import CipherMetadata, unseal, verify_tag
    from pecore.io import read_image, write_image
    from pecore.keys import MasterKey

    master = MasterKey.load(args.key)
    verified = []
    for source in args.inputs:
        sidecar = source.with_suffix(SIDECAR_SUFFIX)
        if not sidecar.exists():
            raise FileNotFoundError(f"{sidecar}: metadata sidecar of {source} is missing")
        try:
            metadata = CipherMetadata.model_validate_json(sidecar.read_text())
        except ValueError as exc:
            raise ValueError(f"{sidecar}: not a cipher metadata sidecar ({exc})") from None
        cipher = read_image(source)
        verify_tag(cipher, metadata, master)
        verified.append((source, cipher, metadata))
    args.out.mkdir(parents=True, exist_ok=True)
    for source, cipher, metadata in verified:
        plain = unseal(cipher, metadata, master)
        target = args.out / f"{metadata.image_id}.png"
        write_image(target, plain)
        if args.restore:
            np.save(args.out / f"{metadata.image_id}.restored.npy", metadata.rescale.restore(plain))
        print(f"{source} -> {target}")
    return 0
