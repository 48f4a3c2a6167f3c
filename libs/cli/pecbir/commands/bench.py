"""`pecbir bench cipher`: the paper's Table 3 (encrypt/decrypt time per 512×512 image).

Measures, over real dataset images (or generated ones when the dataset is absent), the
mean encrypt and decrypt time of all four schemes with a cached key stream, the key-stream
generation time (one key, and per image when many per-image keys are derived in a batch),
and a per-pixel Python loop of "ours" as the side-by-side reference point.  Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (print a table, write JSON)")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    cipher = targets.add_parser("cipher", help="encrypt/decrypt/key-stream time per 512² image")
    cipher.add_argument("--images", type=int, default=32, help="dataset images to time")
    cipher.add_argument("--repeats", type=int, default=5, help="timed repetitions per image")
    cipher.add_argument("--loop-images", type=int, default=2, help="images for the Python loop")
    cipher.add_argument("--batch", type=int, default=16, help="per-image keys in the batch")
    cipher.add_argument("--out", type=Path, default=Path("results/bench/cipher.json"))
    cipher.set_defaults(func=run_cipher)
    roi = targets.add_parser(
        "pe-roi", help="owner and cloud cost per image: pe (ours) against pe-roi"
    )
    roi.add_argument("--images", type=int, default=16, help="dataset images to time")
    roi.add_argument("--repeats", type=int, default=3, help="timed repetitions per image")
    roi.add_argument("--out", type=Path, default=Path("results/bench/pe_roi.json"))
    roi.set_defaults(func=run_pe_roi)


def _bench_images(n: int) -> tuple[list[np.ndarray], str]:
    from pecore.datasets import load_figshare, make_synthetic

    try:
        dataset = load_figshare(limit=n)  # decode only the rows timed, not all 3064
        source = "figshare brain-tumour dataset"
    except FileNotFoundError:
        dataset = make_synthetic(n_images=n, size=512, seed=0)
        source = "generated images (dataset not found)"
    images = [np.asarray(img) for img in dataset.images[:n] if img.shape == (512, 512)]
    return images, source


def _timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def run_cipher(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pecore.cipher import SCHEMES, decrypt, encrypt, encrypt_reference
    from pecore.keys import MasterKey, SSLMKey, derive_image_key, key_stream, key_streams
    from pecore.model_selection import paper_tables

    images, source = _bench_images(args.images)
    n_pixels = 512 * 512
    key = SSLMKey()
    key_stream(key, 16)  # compile the kernels outside the timings
    key_streams([key], 16)

    single = _timed(partial(key_stream, key, n_pixels), args.repeats)
    master = MasterKey.from_seed(0)
    per_image_keys = [derive_image_key(master, f"bench-{i}", 16).sslm for i in range(args.batch)]
    batch = _timed(partial(key_streams, per_image_keys, n_pixels), 1)[0] / args.batch
    stream = key_stream(key, n_pixels)

    rows = {}
    paper_seconds = paper_tables()["table3_seconds"]["rows"]
    progress = tqdm(SCHEMES, desc="schemes", unit="scheme")
    for scheme in progress:
        encrypt_times, decrypt_times, exact = [], [], True
        for image in images:
            cipher = encrypt(image, stream, scheme)
            exact &= bool(np.array_equal(decrypt(cipher, stream, scheme), image))
            encrypt_times += _timed(partial(encrypt, image, stream, scheme), args.repeats)
            decrypt_times += _timed(partial(decrypt, cipher, stream, scheme), args.repeats)
        paper = paper_seconds.get(scheme)
        rows[scheme] = {
            "encrypt_ms_mean": 1e3 * statistics.fmean(encrypt_times),
            "encrypt_ms_p95": 1e3 * float(np.percentile(encrypt_times, 95)),
            "decrypt_ms_mean": 1e3 * statistics.fmean(decrypt_times),
            "decrypt_ms_p95": 1e3 * float(np.percentile(decrypt_times, 95)),
            "round_trip_bit_exact": exact,
            # Ahmad et al. 2025, Table 3 (their machine), for context only; None if not there
            "paper_encrypt_ms": None if paper is None else 1e3 * paper[0],
            "paper_decrypt_ms": None if paper is None else 1e3 * paper[1],
        }

    loop_times = []
    for image in tqdm(images[: args.loop_images], desc="python loop (ours)", unit="image"):
        start = time.perf_counter()
        loop_cipher = encrypt_reference(image, stream, "ours")
        loop_times.append(time.perf_counter() - start)
        if not np.array_equal(loop_cipher, encrypt(image, stream, "ours")):
            raise RuntimeError("vectorised and loop encryption disagree")
    loop_ms = 1e3 * statistics.fmean(loop_times)

    report = {
        "benchmark": "cipher",
        "image_source": source,
        "images": len(images),
        "repeats_per_image": args.repeats,
        "image_shape": [512, 512],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "processor": platform.processor() or platform.machine(),
            # Other jobs on the same cores inflate every figure; read them with this.
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "schemes": rows,
        "key_stream_ms": {
            "single_key_mean": 1e3 * statistics.fmean(single),
            "per_image_in_batch_mean": 1e3 * batch,
            "batch_size": args.batch,
        },
        "python_loop_ours_encrypt_ms": loop_ms,
        "speedup_vs_python_loop": loop_ms / rows["ours"]["encrypt_ms_mean"],
        "targets_ms": {"encrypt": 2.0, "decrypt": 1.0, "key_stream": 20.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\ncipher benchmark: {len(images)} × 512² images from {source}, cached key stream")
    print(f"load average (1 min) on {os.cpu_count()} CPUs: {os.getloadavg()[0]:.2f}")
    header = ("scheme", "encrypt ms", "decrypt ms", "paper enc", "paper dec")
    print(f"{header[0]:<8}{header[1]:>12}{header[2]:>12}{header[3]:>11}{header[4]:>11}  exact")
    for scheme, row in rows.items():
        print(
            f"{scheme:<8}{row['encrypt_ms_mean']:>12.3f}{row['decrypt_ms_mean']:>12.3f}"
            + "".join(
                "          –" if row[key] is None else f"{row[key]:>11.1f}"
                for key in ("paper_encrypt_ms", "paper_decrypt_ms")
            )
            + f"  {row['round_trip_bit_exact']}"
        )
    streams = report["key_stream_ms"]
    print(f"key stream, one key:            {streams['single_key_mean']:8.2f} ms")
    print(f"key stream, per image in batch: {streams['per_image_in_batch_mean']:8.2f} ms")
    print(
        f"python per-pixel loop (ours):   {loop_ms:8.1f} ms  -> vectorised speed-up "
        f"{report['speedup_vs_python_loop']:.0f}×"
    )
    print(f"wrote {args.out}")
    return 0


def run_pe_roi(args: argparse.Namespace) -> int:
    """Owner: encrypt (pe: ours; pe-roi: blank, move tiles, ours, cloud mask) and decrypt.
    Cloud: the per-image part of feature extraction that depends on the mode, i.e. the ROI
    (pe: the cloud dilates the plain mask; pe-roi: the cloud mask as it is) and its patches;
    PCA and Fisher encoding then cost the same per patch in both modes."""
    from tqdm import tqdm

    from pecore.cipher import SCHEMES
    from pecore.cipher_roi import RoiCipher
    from pecore.datasets import load_figshare
    from pecore.features import roi_patches
    from pecore.keys import SSLMKey, key_stream
    from pecore.roi import dilate_mask

    dataset = load_figshare(limit=args.images)
    rows = [i for i, img in enumerate(dataset.images) if img.shape == (512, 512)]
    scheme, ours = RoiCipher(), SCHEMES["ours"]
    stream = key_stream(SSLMKey(), 512 * 512)
    times: dict[str, list[float]] = {
        k: []
        for k in ("pe_encrypt", "pe_roi_encrypt", "pe_roi_decrypt", "pe_cloud", "pe_roi_cloud")
    }
    patches = {"pe": [], "pe_roi": []}
    exact = True
    for i in tqdm(rows, desc="pe vs pe-roi", unit="image"):
        image, mask, nonce = np.asarray(dataset.images[i]), np.asarray(dataset.masks[i]), str(i)
        cipher = ours.encrypt(image, stream)
        roi_cipher = scheme.encrypt(image, stream, mask=mask, nonce=nonce)
        cloud = scheme.cloud_mask(mask, stream, nonce=nonce)
        restored = scheme.decrypt(roi_cipher, stream, mask=mask, nonce=nonce)
        exact &= bool(np.array_equal(restored, scheme.blank(image, mask)))

        def pe_roi_owner(image=image, mask=mask, nonce=nonce):
            scheme.encrypt(image, stream, mask=mask, nonce=nonce)
            scheme.cloud_mask(mask, stream, nonce=nonce)

        def pe_cloud(cipher=cipher, mask=mask):
            return roi_patches(cipher, mask, roi=dilate_mask(mask, 24)).patches.shape[0]

        def pe_roi_cloud(cipher=roi_cipher, cloud=cloud):
            return roi_patches(cipher, cloud, roi=cloud).patches.shape[0]

        times["pe_encrypt"] += _timed(partial(ours.encrypt, image, stream), args.repeats)
        times["pe_roi_encrypt"] += _timed(pe_roi_owner, args.repeats)
        times["pe_roi_decrypt"] += _timed(
            partial(scheme.decrypt, roi_cipher, stream, mask=mask, nonce=nonce),
            args.repeats,
        )
        times["pe_cloud"] += _timed(pe_cloud, args.repeats)
        times["pe_roi_cloud"] += _timed(pe_roi_cloud, args.repeats)
        patches["pe"].append(pe_cloud())
        patches["pe_roi"].append(pe_roi_cloud())
    report = {
        "benchmark": "pe-roi",
        "images": len(rows),
        "repeats_per_image": args.repeats,
        "scheme": scheme.name,
        "tile": scheme.tile,
        "transforms": scheme.transforms,
        "positions": scheme.positions,
        "ms_mean": {k: 1e3 * statistics.fmean(v) for k, v in times.items()},
        "patches_per_image_mean": {k: statistics.fmean(v) for k, v in patches.items()},
        "round_trip_bit_exact": exact,
        "note": "key derivation (per-image keys) is the same for both modes: see "
        "results/bench/cipher.json key_stream_ms; the full slice's AES-GCM seal is not timed here",
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": os.getloadavg()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report["ms_mean"].items():
        print(f"{key:<16}{value:9.2f} ms")
    print(f"patches per image: {report['patches_per_image_mean']}  exact: {exact}")
    print(f"wrote {args.out}")
    return 0
