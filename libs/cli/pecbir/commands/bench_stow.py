"""`pecbir bench-stow-memory`: the encryptor's peak RSS while a PACS pushes one big STOW-RS
request (issue 14: a PACS sends one job as one request; 130 studies were 73 MB).

The encryptor runs in its own process (uvicorn, the embedded cloud behind it on a filesystem
store); this process streams each push to it chunk by chunk (never holding it) and samples
the child's RSS every 20 ms. Each push is 1024x1024 16-bit MR images (2 MiB each) with a
new SOP Instance UID each: `--mode pending` sends images only (each is decoded, sealed and
kept at the hospital until its SEG comes: the body path without the cloud's cost), `--mode
pairs` sends each with its SEG (decoded, encrypted, uploaded to the embedded cloud). Prints a
table and writes JSON under results/dicom/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# The child: an embedded system whose encryptor app is served by uvicorn on a given port.
_CHILD = """
import json, sys
from pathlib import Path
import uvicorn
from pecbir_harness.embedded import EmbeddedSystem
from pecore.keys import MasterKey
root, port = Path(sys.argv[1]), int(sys.argv[2])
with EmbeddedSystem(root, master=MasterKey.from_seed(3)) as system:
    print(json.dumps({"token": system.user_token()}), flush=True)
    uvicorn.run(system.encryptor_app, host="127.0.0.1", port=port, log_level="warning")
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-stow-memory",
        help="encryptor peak RSS while one big STOW-RS push streams in (table + JSON)",
    )
    parser.add_argument(
        "--sizes-mib", default="64,1024", help="push sizes to measure, comma-separated (MiB)"
    )
    parser.add_argument("--mode", choices=("pending", "pairs"), default="pending")
    parser.add_argument("--out", type=Path, default=Path("results/dicom/stow-memory.json"))
    parser.set_defaults(func=run)


def _body(n_images: int, mode: str, boundary: str) -> Iterator[bytes]:
    """The multipart body, one part at a time (memory: one image)."""
    from pecbir_harness.dicom import dicom_bytes, make_mr, make_seg, synthetic_slice

    pixels = synthetic_slice(12, seed=0, shape=(1024, 1024))
    mask = np.zeros(pixels.shape, bool)
    mask[400:600, 380:640] = True
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    for _ in range(n_images):
        image = make_mr(pixels, bits_stored=12)
        yield head + dicom_bytes(image) + b"\r\n"
        if mode == "pairs":
            yield head + dicom_bytes(make_seg(mask, image)) + b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _sample(pid: int, stop: threading.Event, peak: list[int]) -> None:
    import psutil

    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], process.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.02)


def push(url: str, token: str, n_images: int, mode: str, pid: int) -> dict[str, Any]:
    """Stream one push of `n_images` images; its status, bytes, seconds and the peak RSS.

    Parameters
    ----------
    url
        The encryptor's base URL.
    token
        A user token of it.
    n_images
        Images in the push.
    mode
        "pending" (images only) or "pairs" (each with its SEG).
    pid
        The encryptor's process id (RSS sampled).
    """
    import httpx
    import psutil

    boundary = "pecbir-bench-boundary"
    sent = [0]

    def counted() -> Iterator[bytes]:
        for chunk in _body(n_images, mode, boundary):
            sent[0] += len(chunk)
            yield chunk

    before = psutil.Process(pid).memory_info().rss
    peak, stop = [before], threading.Event()
    sampler = threading.Thread(target=_sample, args=(pid, stop, peak), daemon=True)
    sampler.start()
    started = time.perf_counter()
    answer = httpx.post(
        f"{url}/dicomweb/bench/studies",
        content=counted(),
        headers={
            "authorization": f"Bearer {token}",
            "content-type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
        timeout=1800,
    )
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    body = answer.json() if answer.headers.get("content-type", "").endswith("json") else {}
    stored = len(body.get("00081199", {}).get("Value", []))
    return {
        "mode": mode,
        "images": n_images,
        "status": answer.status_code,
        "stored": stored,
        "body_mib": round(sent[0] / 2**20, 1),
        "seconds": round(seconds, 2),
        "instances_per_s": round(stored / seconds, 2) if seconds else None,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_peak_mib": round(peak[0] / 2**20, 1),
    }


def run(args: argparse.Namespace) -> int:
    import httpx

    from pecbir_harness.procs import free_port

    sizes = [int(s) for s in args.sizes_mib.split(",") if s]
    per_image = 2 * 2**20 + (40 * 1024 if args.mode == "pairs" else 0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pecbir-bench-stow-") as tmp:
        port = free_port()
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, tmp, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            token = json.loads(child.stdout.readline())["token"]
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            push(url, token, 2, args.mode, child.pid)  # warm-up: imports, first allocations
            for size in sizes:
                row = push(url, token, max(1, size * 2**20 // per_image), args.mode, child.pid)
                rows.append(row)
                print(json.dumps(row))
        finally:
            child.terminate()
            child.wait(timeout=30)
    lines = [
        "| mode | images | body MiB | status | stored | s | instances/s | RSS before MiB "
        "| RSS peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['images']} | {r['body_mib']} | {r['status']} | {r['stored']} "
            f"| {r['seconds']} | {r['instances_per_s']} | {r['rss_before_mib']} "
            f"| {r['rss_peak_mib']} |"
        )
    table = "\n".join(lines)
    print(table)
    command = f"pecbir bench-stow-memory --sizes-mib {args.sizes_mib} --mode {args.mode}"
    result = {
        "command": command,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_1min": os.getloadavg()[0],
        },
        "rows": rows,
    }
    out = args.out.with_name(f"{args.out.stem}-{args.mode}{args.out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"# Encryptor RSS during one STOW-RS push ({args.mode})\n\n`{command}`; load "
        f"{result['machine']['load_1min']:.2f} on {result['machine']['cpus']} cores.\n\n"
        f"{table}\n"
    )
    print(f"wrote {out}")
    return 0
