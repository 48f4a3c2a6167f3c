"""`pecbir bench-edges`: what one request can cost each service (issue 18, hardened edges).

Two tables. (1) Before authentication: a request with no token, or a bad one, carrying a
large body to a route that takes one, on each HTTP service: the time until the answer starts,
the body bytes the service pulled, and the peak memory Python allocated while answering
(tracemalloc, its own pass so that it does not inflate the times). Target: < 1 MB and < 10 ms.
(2) With a valid token: the worst request each route accepts or fully processes before
refusing it, against a normal one (target: at most 10x): a DICOM deflate bomb and an image
over the pixel limit through the encryptor (ingest and STOW), the largest upload and search
query the gateway takes, and a burst of training requests. Once a model is trained, the
gateway's tasks are no longer run (in a deployment the workers index and train, outside the
request); what is measured is the request itself.

Everything runs in one process on the embedded system (the services' real code, in-process
transports), so it runs unchanged against an older checkout: ``<old venv>/bin/python
libs/cli/pecbir/commands/bench_edges.py --label before`` measures the code that venv has
installed. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pecbir_harness.dicom import dicom_bytes, make_mr, make_seg, multipart_related

# The service's default model (pecbir_contracts.schemas.TrainRequest) where it sets what a
# query costs (patches, regions, ROI dilation, mixture size); trained on fewer patches and
# projected to 2 dimensions so that it trains in seconds on 16 small images.
BENCH_MODEL = {
    "n_components": 64,
    "n_regions": 8,
    "patch_size": 9,
    "radius": 24,
    "n_train_patches": 5000,
    "dim": 2,
}
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-edges", help="cost of one request before auth and worst vs normal (table + JSON)"
    )
    _arguments(parser)
    parser.set_defaults(func=run)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", default="after", help="name of this run (before/after)")
    parser.add_argument("--body-mb", type=int, default=256, help="body of the anonymous requests")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument(
        "--skip-large-query", action="store_true", help="skip the 2048² full-mask query"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON (results/security/…)")
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BEFORE", "AFTER"),
        help="measure nothing: write results/security/edges.md + .json from two runs' JSON",
    )
    parser.add_argument(
        "--note", action="append", default=[], help="with --compare: a note under the tables"
    )


# -- one raw ASGI request ---------------------------------------------------------------------
def _asgi_post(app: Any, path: str, headers: dict[str, str], body_mb: int) -> dict[str, Any]:
    """POST a multipart body of `body_mb` MiB, streamed 1 MiB at a time, straight to `app`."""
    head = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.dcm"\r\n\r\n'
    sent = {"n": 0, "pulled": 0}
    answer: dict[str, Any] = {"status": 0, "first_byte_s": None}
    started = time.perf_counter()

    async def receive() -> dict:
        if sent["n"] >= body_mb:
            return {"type": "http.request", "body": b"\r\n--x--\r\n", "more_body": False}
        chunk = head + _ZEROS if sent["n"] == 0 else _ZEROS
        sent["n"] += 1
        sent["pulled"] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["first_byte_s"] = time.perf_counter() - started

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"multipart/form-data; boundary=x"),
            *((k.encode(), v.encode()) for k, v in headers.items()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
    }
    asyncio.run(app(scope, receive, send))
    return {**answer, "pulled_bytes": sent["pulled"]}


def _measure(call: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Median seconds over `repeats` plain runs (None for none), then the peak bytes of one
    traced run."""
    seconds: list[float] = []
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
    tracemalloc.start()
    tracemalloc.reset_peak()
    call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    median = statistics.median(seconds) if seconds else None
    return {"seconds": median, "peak_bytes": peak, "result": result}


# -- inputs -----------------------------------------------------------------------------------
def _blob(size: int, seed: int, radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
    mask = (rows - cy) ** 2 + (cols - cx) ** 2 <= (radius or size / 6) ** 2
    image = rng.integers(0, 90, size=(size, size)).astype(np.uint8)
    image[mask] += 120
    return image, mask


def _png(array: np.ndarray) -> bytes:
    from pecbir_contracts.png import encode_png

    return encode_png(array)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, *, deflated: bool = False, blob_bytes: int = 0) -> bytes:
    """A 12-bit MR instance; deflated, and with a private blob of `blob_bytes` zeros (which
    deflate to almost nothing: a decompression bomb) where asked."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = make_mr(pixels, bits_stored=12)
    if deflated:
        dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    if blob_bytes:
        dataset.add_new(0x00091010, "OB", bytes(blob_bytes))
    return dicom_bytes(dataset)


def _seg(mask: np.ndarray, image_bytes: bytes) -> bytes:
    import pydicom

    source = pydicom.dcmread(io.BytesIO(image_bytes), stop_before_pixels=True)
    return dicom_bytes(make_seg(mask, source))


# -- the measurements -------------------------------------------------------------------------
def _anonymous(system: Any, body_mb: int, repeats: int) -> list[dict[str, Any]]:
    targets = [
        ("gateway", system.gateway_app, "/v1/collections/brain/images"),
        ("search", system.search_app, "/v1/collections/brain/search"),
        ("encryptor", system.encryptor_app, "/v1/collections/brain/images"),
        ("encryptor", system.encryptor_app, "/dicomweb/brain/studies"),
    ]
    rows = []
    for service, app, path in targets:
        _asgi_post(app, "/healthz", {}, 0)  # builds the app's middleware stack (first call)
        for name, headers in (("no token", {}), ("bad token", {"authorization": "Bearer a.b.c"})):
            firsts = [_asgi_post(app, path, headers, body_mb) for _ in range(repeats)]
            measured = _measure(lambda a=app, p=path, h=headers: _asgi_post(a, p, h, body_mb), 0)
            result = firsts[-1]
            rows.append(
                {
                    "service": service,
                    "route": path,
                    "request": f"{name}, {body_mb} MiB body",
                    "status": result["status"],
                    "seconds": statistics.median(r["first_byte_s"] for r in firsts),
                    "peak_bytes": measured["peak_bytes"],
                    "pulled_bytes": result["pulled_bytes"],
                }
            )
    return rows


class _Discard:
    """A task dispatcher that queues nothing (the request's own cost is what is measured)."""

    def send(self, task_name: str, args: Any) -> None:
        return None


def _status(answer: Any) -> int:
    return int(answer.status_code)


def _authenticated(system: Any, repeats: int, large_query: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def case(route: str, request: str, call: Callable[[], Any], n: int = repeats) -> None:
        measured = _measure(call, n)
        rows.append(
            {
                "route": route,
                "request": request,
                "status": _status(measured["result"]),
                "seconds": measured["seconds"],
                "peak_bytes": measured["peak_bytes"],
            }
        )

    encryptor, gateway = system.encryptor, system.gateway
    # A trained collection, so that search queries are featurised.
    for seed in range(16):
        image, mask = _blob(128, seed)
        encryptor.post(
            "/v1/collections/brain/images",
            files={"image": ("x.npy", _npy(image)), "mask": ("m.npy", _npy(mask))},
            data={"label": str(1 + seed % 3), "train": "true"},
        )
    trained = gateway.post("/v1/collections/brain/model/train", json=BENCH_MODEL)
    gateway.get(trained.json()["status_url"])
    system.wait_searchable("brain", 16)
    # From here on the gateway queues tasks without running them: the embedded system would
    # run indexing and training inside the request, which a deployment does in its workers.
    system.gateway_app.state.context.dispatcher = _Discard()

    # Encryptor ingest: a normal 512² DICOM slice, a deflate bomb, an image over the limit.
    normal_image, normal_mask = _blob(512, 1, radius=33)  # ~3,400 px: the median tumour
    normal = _dicom(normal_image)
    mask_png = _png(normal_mask)
    bomb = _dicom(normal_image, deflated=True, blob_bytes=200 * _CHUNK)
    ingest = "POST encryptor /v1/collections/{c}/images"

    def ingest_call(image_bytes: bytes, mask_bytes: bytes) -> Callable[[], Any]:
        return lambda: encryptor.post(
            "/v1/collections/brain/images",
            files={"image": ("i.dcm", image_bytes), "mask": ("m.png", mask_bytes)},
            data={"label": "1", "train": "true"},
        )

    case(ingest, "normal: 512² DICOM", ingest_call(normal, mask_png))
    case(ingest, "deflate bomb (0.5 MiB → 200 MiB)", ingest_call(bomb, mask_png))
    huge_image, huge_mask = _blob(4000, 2)
    huge = _dicom(huge_image)
    case(ingest, "4000² DICOM (over the gateway's limit)", ingest_call(huge, _png(huge_mask)), 1)

    # STOW: the same 4000² image with its SEG, against a normal pair.
    stow = "POST encryptor /dicomweb/{c}/studies"

    def stow_call(image_bytes: bytes, mask: np.ndarray) -> Callable[[], Any]:
        body, content_type = multipart_related([image_bytes, _seg(mask, image_bytes)])
        return lambda: encryptor.post(
            "/dicomweb/brain/studies", content=body, headers={"content-type": content_type}
        )

    case(stow, "normal: 512² image + SEG", stow_call(_dicom(normal_image), normal_mask))
    case(stow, "4000² image + SEG", stow_call(huge, huge_mask), 1)
    del huge, huge_image, huge_mask

    # Gateway upload: normal 512² against the largest accepted (max_pixels).
    settings = system.gateway_app.state.context.settings
    side = int(settings.max_pixels**0.5)
    store = system.gateway_app.state.context.store
    stored_meta = json.loads(
        store.get(next(k for k in store.list("tenants/") if k.endswith("meta.json")))
    )
    upload = "POST gateway /v1/collections/{c}/images"

    def upload_call(image: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
        cipher_png, mask_png = _png(image), _png(mask)
        sizes = {"height": image.shape[0], "width": image.shape[1]}

        def call() -> Any:
            # a new opaque id each time: the image id derives from it, and a second upload
            # of other pixels under one id is refused (409) before any of the work measured
            metadata = {**stored_meta, **sizes, "opaque_id": f"edge-{uuid.uuid4().hex}"}
            files = {
                "cipher": ("c.png", cipher_png),
                "mask": ("m.png", mask_png),
                "metadata": (None, json.dumps(metadata)),
            }
            return gateway.post("/v1/collections/brain/images", files=files)

        return call

    case(upload, "normal: 512²", upload_call(normal_image, normal_mask))
    big_image, big_mask = _blob(side, 3)
    case(upload, f"largest accepted: {side}²", upload_call(big_image, big_mask))

    # Gateway search: a normal query against the largest the gateway accepts.
    search = "POST gateway /v1/collections/{c}/search"

    def search_call(image: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
        files = {"cipher": ("c.png", _png(image)), "mask": ("m.png", _png(mask))}
        return lambda: gateway.post("/v1/collections/brain/search", files=files)

    case(search, "normal: 512², 3,400-px tumour", search_call(normal_image, normal_mask))
    query_pixels = getattr(settings, "max_query_pixels", settings.max_pixels)
    roi_pixels = getattr(settings, "max_query_roi_pixels", query_pixels)
    side = int(query_pixels**0.5)
    image = np.random.default_rng(4).integers(0, 255, (side, side)).astype(np.uint8)
    mask = np.zeros((side, side), bool)
    roi_side = int(roi_pixels**0.5)
    mask[:roi_side, :roi_side] = True
    if hasattr(settings, "max_query_pixels"):  # without query caps, the next is the largest
        case(
            search,
            f"largest accepted: {side}², {int(mask.sum())}-px tumour",
            search_call(image, mask),
            1,
        )
    if large_query:
        big_mask[:] = True
        case(
            search,
            f"{int(settings.max_pixels**0.5)}², full mask",
            search_call(big_image, big_mask),
            1,
        )

    # Training: how many versions a burst of 20 requests starts.
    started = time.perf_counter()
    statuses = [
        gateway.post("/v1/collections/brain/model/train", json=BENCH_MODEL).status_code
        for _ in range(20)
    ]
    rows.append(
        {
            "route": "POST gateway /v1/collections/{c}/model/train",
            "request": "burst of 20",
            "status": statuses[-1],
            "seconds": time.perf_counter() - started,
            "peak_bytes": None,
            "accepted": statuses.count(202),
        }
    )
    return rows


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _table(anonymous: list[dict], authenticated: list[dict]) -> str:
    lines = [
        "Before authentication (one request, no valid token):",
        f"{'service':10} {'route':34} {'request':26} {'status':>6} {'ms':>9} "
        f"{'peak MB':>8} {'body read MB':>12}",
    ]
    for row in anonymous:
        lines.append(
            f"{row['service']:10} {row['route']:34} {row['request']:26} {row['status']:>6} "
            f"{row['seconds'] * 1000:>9.1f} {_mb(row['peak_bytes']):>8} "
            f"{_mb(row['pulled_bytes']):>12}"
        )
    lines += [
        "",
        "With a valid token (worst accepted or fully processed vs normal):",
        f"{'route':44} {'request':42} {'status':>6} {'ms':>9} {'peak MB':>8} {'x normal':>8}",
    ]
    normal: dict[str, dict] = {}
    for row in authenticated:
        if row["request"].startswith("normal"):
            normal[row["route"]] = row
        base = normal.get(row["route"])
        ratio = f"{row['seconds'] / base['seconds']:.1f}" if base else "-"
        extra = f" ({row['accepted']} accepted)" if "accepted" in row else ""
        lines.append(
            f"{row['route']:44} {row['request'] + extra:42} {row['status']:>6} "
            f"{row['seconds'] * 1000:>9.1f} {_mb(row['peak_bytes']):>8} {ratio:>8}"
        )
    return "\n".join(lines)


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    peak = "" if row["peak_bytes"] is None else f", {_mb(row['peak_bytes'])} MB"
    read = f", read {_mb(row['pulled_bytes'])} MB" if "pulled_bytes" in row else ""
    accepted = f", {row['accepted']} accepted" if "accepted" in row else ""
    return f"{row['status']}, {row['seconds'] * 1000:.1f} ms{peak}{read}{accepted}"


def compare(
    before_path: Path, after_path: Path, out_dir: Path, notes: list[str] | None = None
) -> str:
    """The before/after tables (markdown) of two runs; also written as edges.md/edges.json."""
    before, after = (json.loads(p.read_text()) for p in (before_path, after_path))
    lines = [
        "# Hardened edges: cost of one request (issue 18)",
        "",
        f"`pecbir bench-edges` (before: {before['label']}, after: {after['label']}; "
        f"{after['platform']}, Python {after['python']}). Status, time to the answer, peak "
        "memory Python allocated (tracemalloc, its own run), and for anonymous requests the "
        "body bytes the service read before answering. Times are medians of the repetitions "
        "on a shared 2-core machine: compare within a row.",
        "",
        "## Before authentication (target: < 1 MB, < 10 ms)",
        "",
        "| service | route | request | before | after |",
        "|---|---|---|---|---|",
    ]
    old = {(r["service"], r["route"], r["request"]): r for r in before["anonymous"]}
    for row in after["anonymous"]:
        key = (row["service"], row["route"], row["request"])
        lines.append(f"| {key[0]} | `{key[1]}` | {key[2]} | {_cell(old.get(key))} | {_cell(row)} |")
    lines += [
        "",
        "## With a valid token: worst request vs a normal one (target: at most 10x)",
        "",
        "| route | request | before | after |",
        "|---|---|---|---|",
    ]
    old = {(r["route"], r["request"]): r for r in before["authenticated"]}
    seen = set()
    for row in [*after["authenticated"], *before["authenticated"]]:
        key = (row["route"], row["request"])
        if key in seen:
            continue
        seen.add(key)
        new = {(r["route"], r["request"]): r for r in after["authenticated"]}.get(key)
        lines.append(f"| `{key[0]}` | {key[1]} | {_cell(old.get(key))} | {_cell(new)} |")
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "edges.md").write_text(text)
    (out_dir / "edges.json").write_text(
        json.dumps({"before": before, "after": after, "notes": notes or []}, indent=1, default=str)
        + "\n"
    )
    return text


def run(args: argparse.Namespace) -> int:
    import logging

    if args.compare:
        print(compare(*args.compare, Path("results/security"), args.note))
        return 0

    from pecbir_harness.embedded import EmbeddedSystem

    logging.disable(logging.WARNING)
    out = args.out or Path(f"results/security/edges-{args.label}.json")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedSystem(Path(tmp)) as system:
        anonymous = _anonymous(system, args.body_mb, args.repeats)
        authenticated = _authenticated(system, args.repeats, not args.skip_large_query)
    print(_table(anonymous, authenticated))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "label": args.label,
        "options": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "platform": platform.platform(),
        "python": platform.python_version(),
        "anonymous": anonymous,
        "authenticated": authenticated,
    }
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":  # run by path with another checkout's venv (the "before" numbers)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _arguments(parser)
    raise SystemExit(run(parser.parse_args()))
