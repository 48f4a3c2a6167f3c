"""`pecbir bench-dicom`: decode time per DICOM instance for each transfer syntax (issue 14).

Each syntax a PACS commonly sends is written by a real encoder (`pecbir_harness.dicom.
ENCODINGS`: DCMTK, GDCM, OpenJPH) from one synthetic 12-bit slice (8-bit for JPEG baseline);
the encryptor's reader (`pecore.io.read_dicom`: parse, size checks, decode through pydicom's
pixel handlers and the pylibjpeg plugins) then decodes it `--repeats` times. Prints a table and
writes JSON (and the same table as Markdown) under results/dicom/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-dicom", help="decode time per instance for each DICOM transfer syntax (table+JSON)"
    )
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the slice")
    parser.add_argument("--repeats", type=int, default=20, help="timed decodes per syntax")
    parser.add_argument("--out", type=Path, default=Path("results/dicom/decode.json"))
    parser.set_defaults(func=run)


def measure(size: int, repeats: int) -> list[dict[str, Any]]:
    """One row per encoding: file size, decode time (median, p95), max error, lossy mark.

    Parameters
    ----------
    size
        Rows and columns of the slice.
    repeats
        Timed decodes per encoding (after one untimed warm-up).

    Returns
    -------
    list of dict
        Rows in `ENCODINGS` order; an encoding whose encoder is missing has ``"skipped"``.
    """
    from pecbir_harness.dicom import ENCODINGS, dicom_bytes, encode, make_mr, synthetic_slice
    from pecore.io import dicom_is_lossy, read_dicom

    rows = []
    for encoding in ENCODINGS:
        pixels = synthetic_slice(encoding.bits_stored, seed=0, shape=(size, size))
        row: dict[str, Any] = {
            "name": encoding.name,
            "syntax": encoding.syntax,
            "encoder": encoding.tool,
            "bits_stored": encoding.bits_stored,
        }
        try:
            data = encode(dicom_bytes(make_mr(pixels, bits_stored=encoding.bits_stored)), encoding)
        except RuntimeError as exc:
            rows.append({**row, "skipped": str(exc)})
            continue
        decoded, dataset = read_dicom(data)  # warm-up: imports, plugin discovery
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            read_dicom(data)
            times.append(time.perf_counter() - started)
        times.sort()
        error = np.abs(decoded.astype(np.int64) - pixels.astype(np.int64))
        rows.append(
            {
                **row,
                "file_bytes": len(data),
                "ratio": round(pixels.nbytes / len(data), 2),
                "decode_ms_median": round(1000 * statistics.median(times), 3),
                "decode_ms_p95": round(
                    1000 * times[min(len(times) - 1, int(0.95 * len(times)))], 3
                ),
                "max_abs_error": int(error.max()),
                "lossy_marked": dicom_is_lossy(dataset),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| syntax | UID | encoder | bits | bytes | ratio | decode ms (median) | p95 | max error "
        "| lossy mark |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['name']} | {row['syntax']} | {row['encoder']} | skipped: "
                         f"{row['skipped']} | | | | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {row['name']} | {row['syntax']} | {row['encoder']} | {row['bits_stored']} "
            f"| {row['file_bytes']} | {row['ratio']} | {row['decode_ms_median']} "
            f"| {row['decode_ms_p95']} | {row['max_abs_error']} | {row['lossy_marked']} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    import pydicom

    rows = measure(args.size, args.repeats)
    text = table(rows)
    print(text)
    versions = {"pydicom": pydicom.__version__}
    for module in ("pylibjpeg", "libjpeg", "openjpeg", "rle"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = None
    result = {
        "command": f"pecbir bench-dicom --size {args.size} --repeats {args.repeats}",
        "size": args.size,
        "repeats": args.repeats,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_1min": os.getloadavg()[0],
        },
        "versions": versions,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# Decode time per DICOM instance ({args.size}x{args.size}, {args.repeats} repeats)\n\n"
        f"`{result['command']}`; load {result['machine']['load_1min']:.2f} on "
        f"{result['machine']['cpus']} cores.\n\n{text}\n"
    )
    print(f"wrote {args.out}")
