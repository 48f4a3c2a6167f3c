"""`pecbir-encryptor` (or `python -m pecbir_encryptor`): the owner side from a shell.

    pecbir-encryptor serve  [--host H --port P]          run the FastAPI app (uvicorn)
    pecbir-encryptor upload IMAGE MASK --collection C [--label L]
    pecbir-encryptor fetch  IMAGE_ID --collection C --out plain.png|.npy
    pecbir-encryptor rotate [--master-key F --keyring-dir D]   new master key, old one retired
    pecbir-encryptor rewrap IMAGE_ID [IMAGE_ID ...] --collection C   after a rotation: re-wrap
                                                     sealed images' data keys (active key)
    pecbir-encryptor pending [--sweep]                  what waits in the pending store (image
                                                     without SEG, SEG without image) and for
                                                     how long; --sweep: expire and settle now
    pecbir-encryptor patch-model --collection C IMAGE MASK [IMAGE MASK ...] [--components K]
                                                     fit a sealed collection's patch model on
                                                     plain images, keep it, publish it

Settings come from PECBIR_ENCRYPTOR_* variables (tenant, master key file, gateway URL and
token); `fetch` verifies the owner's integrity tag before it decrypts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx


def _encryptor():
    from pecbir_encryptor.deps import build_encryptor
    from pecbir_encryptor.settings import EncryptorSettings
    from pecbir_platform.config import settings_from_env

    return build_encryptor(settings_from_env(EncryptorSettings))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("pecbir_encryptor.app:create_app", factory=True, host=args.host, port=args.port)
    return 0


def _upload(args: argparse.Namespace) -> int:
    from pecbir_encryptor.inputs import read_mask, read_pixels

    encryptor = _encryptor()
    pixels, source_uid = read_pixels(Path(args.image).read_bytes(), "image")
    mask, seg_label = read_mask(Path(args.mask).read_bytes())
    opaque_id = encryptor.opaque_id_for(source_uid or f"file:{Path(args.image).resolve()}")
    answer = encryptor.ingest(
        args.collection,
        pixels,
        mask,
        opaque_id=opaque_id,
        label=args.label if args.label is not None else seg_label,
        train=not args.no_train,
        idempotency_key=f"owner-{args.collection}-{opaque_id}",
    )
    print(json.dumps({"opaque_id": opaque_id, "upload": answer}))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from pecbir_encryptor.integrity import IntegrityError
    from pecore.io import write_image

    encryptor = _encryptor()
    try:
        opened = encryptor.fetch_plain(args.collection, args.image_id)
    except IntegrityError as exc:
        encryptor.audit.write(
            action="decrypt", sub="cli", image_id=args.image_id, outcome="refused", reason=str(exc)
        )
        raise
    write_image(args.out, opened.image)
    encryptor.audit.write(action="decrypt", sub="cli", image_id=args.image_id, outcome="ok")
    opaque_id = opened.record.opaque_id
    print(f"verified and decrypted {args.image_id} (opaque id {opaque_id}) to {args.out}")
    return 0


def _patch_model(args: argparse.Namespace) -> int:
    from pecbir_encryptor.inputs import read_mask, read_pixels

    files = list(args.files)
    if not files or len(files) % 2:
        raise ValueError("give the plain images and their masks as IMAGE MASK pairs")
    images, masks = [], []
    for image_path, mask_path in zip(files[::2], files[1::2], strict=True):
        images.append(read_pixels(Path(image_path).read_bytes(), str(image_path))[0])
        masks.append(read_mask(Path(mask_path).read_bytes())[0])
    digest = _encryptor().publish_patch_model(
        args.collection,
        images,
        masks,
        n_components=args.components,
        n_regions=args.regions,
        patch_size=args.patch_size,
        radius=args.radius,
    )
    print(f"published the patch model of {args.collection} (sha256 {digest}), {len(images)} images")
    return 0


def _rewrap(args: argparse.Namespace) -> int:
    encryptor = _encryptor()
    for image_id in args.image_ids:
        old, new = encryptor.rewrap(args.collection, image_id)
        encryptor.audit.write(action="rewrap", sub="cli", image_id=image_id, outcome="ok")
        print(f"{image_id}: {'re-wrapped from ' + old if old != new else 'already'} under {new}")
    return 0


def _pending(args: argparse.Namespace) -> int:
    from pecbir_encryptor.janitor import PendingJanitor
    from pecbir_encryptor.settings import EncryptorSettings
    from pecbir_platform.config import settings_from_env

    settings = settings_from_env(EncryptorSettings)
    encryptor = _encryptor()
    if encryptor.pending is None:
        raise ValueError("no pending store: PECBIR_ENCRYPTOR_PENDING_DIR is unset")
    janitor = PendingJanitor(encryptor, settings.pending_ttl_s, settings.pending_sweep_interval_s)
    if args.sweep:
        expired = janitor.sweep()
        for half in expired:
            print(f"expired {half.collection} {half.kind} {half.key} after {half.age_s:.0f} s")
    print(json.dumps(janitor.status(), indent=2, sort_keys=True))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    import os

    from pecbir_encryptor.keyring import rotate

    active = args.master_key or os.environ.get("PECBIR_ENCRYPTOR_MASTER_KEY")
    retired = args.keyring_dir or os.environ.get("PECBIR_ENCRYPTOR_KEYRING_DIR")
    if not active or not retired:
        raise ValueError(
            "rotate needs --master-key and --keyring-dir "
            "(or PECBIR_ENCRYPTOR_MASTER_KEY and PECBIR_ENCRYPTOR_KEYRING_DIR)"
        )
    old, new = rotate(Path(active), Path(retired))
    print(f"retired master key {old} into {retired}; new active key {new} in {active}")
    print("restart the encryptor; images uploaded before still decrypt with the retired key")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from pecbir_platform.config import show_defaults, version

    parser = argparse.ArgumentParser(prog="pecbir-encryptor", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=version("pecbir-encryptor"))
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the encryptor API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8003)
    serve.set_defaults(func=_serve)
    upload = commands.add_parser("upload", help="encrypt one image and upload it")
    upload.add_argument("image", help="DICOM, PNG or NPY")
    upload.add_argument("mask", help="PNG, NPY or DICOM SEG")
    upload.add_argument("--collection", required=True)
    upload.add_argument("--label", type=int, default=None)
    upload.add_argument(
        "--no-train", action="store_true", help="not a training template: the cloud gets no label"
    )
    upload.set_defaults(func=_upload)
    fetch = commands.add_parser("fetch", help="download, verify and decrypt one image")
    fetch.add_argument("image_id")
    fetch.add_argument("--collection", required=True)
    fetch.add_argument("--out", type=Path, required=True)
    fetch.set_defaults(func=_fetch)
    patch = commands.add_parser(
        "patch-model", help="fit and publish a sealed collection's patch model (PCA + GMM)"
    )
    patch.add_argument("files", nargs="+", help="IMAGE MASK pairs of plain images")
    patch.add_argument("--collection", required=True)
    patch.add_argument("--components", type=int, default=64, help="GMM size K (the paper's D)")
    patch.add_argument("--regions", type=int, default=8)
    patch.add_argument("--patch-size", type=int, default=9)
    patch.add_argument("--radius", type=int, default=24)
    patch.set_defaults(func=_patch_model)
    rewrap_cmd = commands.add_parser(
        "rewrap", help="re-wrap sealed images' data keys under the active master key"
    )
    rewrap_cmd.add_argument("image_ids", nargs="+")
    rewrap_cmd.add_argument("--collection", required=True)
    rewrap_cmd.set_defaults(func=_rewrap)
    pending = commands.add_parser(
        "pending", help="halves of image <-> SEG pairs waiting for the other, and their age"
    )
    pending.add_argument(
        "--sweep", action="store_true", help="expire what waited too long, settle versions"
    )
    pending.set_defaults(func=_pending)
    rotate = commands.add_parser("rotate", help="rotate the master key (keeps the old one)")
    rotate.add_argument("--master-key", type=Path, default=None)
    rotate.add_argument("--keyring-dir", type=Path, default=None)
    rotate.set_defaults(func=_rotate)
    show_defaults(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as exc:
        print(f"pecbir-encryptor {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except httpx.TransportError as exc:
        url = exc.request.url if exc.request else "?"
        print(
            f"pecbir-encryptor {args.command}: error: cannot reach the gateway at {url} "
            f"({type(exc).__name__}: {exc}); check PECBIR_ENCRYPTOR_GATEWAY_URL",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
