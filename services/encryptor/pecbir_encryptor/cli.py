"""`pecbir-encryptor` (or `python -m pecbir_encryptor`): the owner side from a shell.

    pecbir-encryptor serve  [--host H --port P]          run the FastAPI app (uvicorn)
    pecbir-encryptor upload IMAGE MASK --collection C [--label L]
    pecbir-encryptor fetch  IMAGE_ID --collection C --out plain.png|.npy
    pecbir-encryptor rotate [--master-key F --keyring-dir D]   new master key, old one retired
    pecbir-encryptor rewrap [IMAGE_ID ...] --collection C [--workers N]   after a rotation:
                                                     re-wrap sealed images' data keys (active
                                                     key); default: every sealed upload recorded
    pecbir-encryptor signing-key --out F | public-key | publish-protection --collection C
                                                     the owner's signature over its collections'
                                                     protection (peers check it)
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
        train=args.train,
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
    import time

    encryptor = _encryptor()
    image_ids = list(args.image_ids) or encryptor.sealed_uploads(args.collection)
    if not image_ids:
        print(f"no sealed or pe-roi uploads of {args.collection} in this hospital's records")
        return 0
    started = time.monotonic()

    def progress(result, done: int, total: int) -> None:
        rate = done / max(time.monotonic() - started, 1e-9)
        what = {
            "rewrapped": f"re-wrapped from {result.old_key_id} under {result.new_key_id}",
            "current": f"already under {result.new_key_id}",
            "failed": f"FAILED: {result.reason}",
        }[result.state]
        print(f"[{done}/{total} {rate:.1f}/s] {result.image_id}: {what}", flush=True)

    results = encryptor.rewrap_many(
        args.collection, image_ids, workers=args.workers, progress=progress
    )
    counts = {state: sum(r.state == state for r in results) for state in ("rewrapped", "current")}
    failed = [r for r in results if r.state == "failed"]
    print(
        f"{len(results)} images: {counts['rewrapped']} re-wrapped, {counts['current']} already "
        f"current, {len(failed)} failed ({time.monotonic() - started:.1f} s)"
    )
    if failed:
        print(
            "run it again for the failed ones (each re-wrap is whole or nothing)", file=sys.stderr
        )
        return 1
    return 0


def _signing_key(args: argparse.Namespace) -> int:
    from pecbir_encryptor.protection import generate_signing_key, public_key_b64

    key = generate_signing_key(args.out)
    print(f"wrote {args.out} (0600); set PECBIR_ENCRYPTOR_SIGNING_KEY={args.out}")
    print(f"public key (for the peers' PECBIR_ENCRYPTOR_TRUSTED_OWNERS): {public_key_b64(key)}")
    return 0


def _public_key(args: argparse.Namespace) -> int:
    from pecbir_encryptor.protection import public_key_b64

    encryptor = _encryptor()
    print(json.dumps({encryptor.tenant: public_key_b64(encryptor.signing_key)}))
    return 0


def _publish_protection(args: argparse.Namespace) -> int:
    record = _encryptor().publish_protection(args.collection)
    print(f"published the signed protection record of {args.collection}: {record.model_dump()}")
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
        "--train",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a training template (the cloud reads its label) or not (--no-train); default: "
        "the owner's policy (PECBIR_ENCRYPTOR_TEMPLATE_COLLECTIONS)",
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
    rewrap_cmd.add_argument(
        "image_ids",
        nargs="*",
        help="cloud ids (default: every sealed/pe-roi upload in this hospital's records)",
    )
    rewrap_cmd.add_argument("--collection", required=True)
    rewrap_cmd.add_argument("--workers", type=int, default=4, help="re-wraps in flight")
    rewrap_cmd.set_defaults(func=_rewrap)
    pending = commands.add_parser(
        "pending", help="halves of image <-> SEG pairs waiting for the other, and their age"
    )
    pending.add_argument(
        "--sweep", action="store_true", help="expire what waited too long, settle versions"
    )
    pending.set_defaults(func=_pending)
    signing = commands.add_parser(
        "signing-key", help="make the owner's Ed25519 key that signs protection records"
    )
    signing.add_argument("--out", type=Path, required=True)
    signing.set_defaults(func=_signing_key)
    public = commands.add_parser(
        "public-key", help="print this owner's public key, for its peers' trust lists"
    )
    public.set_defaults(func=_public_key)
    publish = commands.add_parser(
        "publish-protection", help="sign and publish a collection's protection record"
    )
    publish.add_argument("--collection", required=True)
    publish.set_defaults(func=_publish_protection)
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
