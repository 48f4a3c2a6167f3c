"""`pecbir bench-ui`: the radiologist's page, timed in a real browser, and its screenshots.

Three hospitals on one embedded cloud (every service in this process; the page served over
real HTTP on loopback): hospital-a, whose encryptor serves the page (pe), hospital-b
(sealed; releases its keys to hospital-a) and hospital-c (pe; refuses). Debian's chromium,
headless (Playwright), signs in and runs `--queries` queries by upload with all three
hospitals and k = `--k`; for each, the time from pressing "Find similar cases" to the first
hit decrypted and displayed (the image decoded in the page). Prints a table and writes JSON;
with --screenshots, also the page's main states as PNGs (1280×800). `--stack processes`
times the same page through the real processes instead (radosgw, Redis, Celery worker,
uvicorn gateway, search and encryptor on loopback: `pecbir_harness.procs.Cluster`), with one
hospital, since that stack runs one encryptor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pecbir.commands.demo import NOISY_LOGGERS, _load, _pick

FIRST_HIT_SHOWN = """() => {
  const img = document.querySelector('.tile[data-state=shown] img.plain');
  return !!img && img.complete && img.naturalWidth > 0;
}"""


ALL_TILES_SETTLED = "() => document.getElementById('hits')?.dataset.settled === 'true'"
ALL_CLOUD_IMAGES_SHOWN = """() => Array.from(document.querySelectorAll('.tile img.cloud'))
  .every(i => i.complete && i.naturalWidth > 0)"""
FIRST_OPEN_MS = """() => Number(
  document.querySelector('.tile[data-state=shown]')?.dataset.openMs ?? NaN)"""
SERVER_SEARCH = re.compile(r"search (\d+) ms")
# hospital-a's DICOM-ingested images link to this (made-up) viewer: the screenshots show it.
VIEWER_URL = "https://viewer.hospital-a.example/viewer?StudyInstanceUIDs={study}"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-ui",
        help="the radiologist's page in chromium: query to first hit shown, and screenshots",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--images", type=int, default=150, help="dataset images in all")
    parser.add_argument("--queries", type=int, default=50, help="queries timed")
    parser.add_argument("--k", type=int, default=10, help="hits per query")
    parser.add_argument("--n-components", type=int, default=16, help="GMM components (D)")
    parser.add_argument("--n-train-patches", type=int, default=30_000, help="PCA/GMM sample")
    parser.add_argument("--data", type=Path, default=None, help="dataset .h5 (default PECBIR_DATA)")
    parser.add_argument("--synthetic", action="store_true", help="use generated images")
    parser.add_argument("--seed", type=int, default=0, help="sample and key seed")
    parser.add_argument("--radius", type=int, default=24, help="ROI dilation radius")
    parser.add_argument(
        "--stack",
        choices=("embedded", "processes"),
        default="embedded",
        help="every service in this process (three hospitals), or real processes (one)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default results/ui/bench-<stack>.json)"
    )
    parser.add_argument(
        "--screenshots",
        type=Path,
        default=None,
        help="folder for the screenshots of the page's main states (none by default)",
    )
    parser.set_defaults(func=run)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, row: int, seed: int) -> bytes:
    """Row `row` as a DICOM file, its UIDs derived from row and seed: the same pseudonyms,
    keys and ciphers every run (random UIDs would change the pe features, so the numbers)."""
    from pydicom.uid import generate_uid

    from pecbir_harness.dicom import dicom_bytes, make_mr

    pixels = np.asarray(pixels)
    mr = make_mr(pixels, bits_stored=8 if pixels.dtype == np.uint8 else 16)
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(mr, name, generate_uid(entropy_srcs=["pecbir bench-ui", name, str(seed), str(row)]))
    mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
    return dicom_bytes(mr)


def _model_params(args, source: str) -> dict[str, object]:
    """The training request of every hospital's collection (a small radius on generated data)."""
    return {
        "n_components": args.n_components,
        "n_regions": 8,
        "patch_size": 9,
        "radius": args.radius if source == "figshare" else min(args.radius, 8),
        "n_train_patches": args.n_train_patches,
        "dim": 10,
        "random_state": args.seed,
    }


def _world(args, dataset, source, database, workdir):
    """The three hospitals, their uploads and models; (system, seconds it took)."""
    from pecbir_harness.embedded import EmbeddedSystem
    from pecore.keys import MasterKey

    params = _model_params(args, source)
    system = EmbeddedSystem(
        workdir,
        master=MasterKey.from_seed(args.seed),
        shared_collections="hospital-b/brain=hospital-a;hospital-c/brain=hospital-a",
        ui_collections=("brain", "hospital-b/brain", "hospital-c/brain"),
        viewer_url=VIEWER_URL,
    )
    b = system.add_hospital(
        "hospital-b",
        master=MasterKey.from_seed(args.seed + 1),
        sealed_collections=frozenset({"brain"}),
    )
    c = system.add_hospital(
        "hospital-c", master=MasterKey.from_seed(args.seed + 2), releases_keys=False
    )
    shares = {"hospital-a": database[0::5].tolist() + database[1::5].tolist()}
    shares["hospital-a"] += database[2::5].tolist()
    shares["hospital-b"] = database[3::5].tolist()
    shares["hospital-c"] = database[4::5].tolist()
    clients = {"hospital-a": system.encryptor, "hospital-b": b.encryptor, "hospital-c": c.encryptor}
    for tenant, rows in shares.items():
        client = clients[tenant]
        if tenant == "hospital-b":
            published = client.post(
                "/v1/collections/brain/patch-model",
                files=[("images", (f"{r}.npy", _npy(dataset.images[r]))) for r in rows]
                + [("masks", (f"{r}.npy", _npy(dataset.masks[r]))) for r in rows],
                data={
                    k: str(params[k]) for k in ("n_components", "n_regions", "patch_size", "radius")
                },
            )
            if published.status_code != 201:
                raise RuntimeError(f"patch model of hospital-b refused: {published.text}")
        for i, row in enumerate(rows):
            # half of hospital-a's images come as DICOM files (a viewer link on the page)
            image = (
                ("slice.dcm", _dicom(dataset.images[row], row, args.seed))
                if tenant == "hospital-a" and i % 2 == 0
                else ("slice.npy", _npy(dataset.images[row]))
            )
            answer = client.post(
                "/v1/collections/brain/images",
                files={"image": image, "mask": ("mask.npy", _npy(dataset.masks[row]))},
                data={"label": str(int(dataset.labels[row])), "train": "true"},
            )
            if answer.status_code != 202:
                raise RuntimeError(f"upload of row {row} to {tenant} failed: {answer.text}")
        model = {"dim": 10, "random_state": args.seed} if tenant == "hospital-b" else params
        headers = {"authorization": f"Bearer {system.cloud_token(tenant=tenant)}"}
        trained = system.gateway.post(
            "/v1/collections/brain/model/train", json=model, headers=headers
        )
        if trained.status_code != 202:
            raise RuntimeError(f"training of {tenant}/brain refused: {trained.text}")
        # eager tasks: the training ran inside that request; its status says how it ended
        state = system.gateway.get(trained.json()["status_url"], headers=headers).json()
        if state["state"] != "trained":
            raise RuntimeError(f"training of {tenant}/brain failed: {state}")
        _wait(system, headers, len(rows))
        print(f"{tenant}: {len(rows)} images, model trained and indexed", flush=True)
    return system


def _wait(system, headers, n, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = system.gateway.get("/v1/collections/brain/model", headers=headers).json()
        if status["serving_version"] and status["n_vectors"] >= n:
            return
        time.sleep(0.05)
    raise TimeoutError("the collection did not become searchable")


def _sign_in(page, token):
    page.goto("/ui/")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/")


def _query(page, image: Path, mask: Path, k: int) -> tuple[float, float, float, float]:
    """Submit one query by upload; seconds from the click to the first hit shown and to
    every tile settled, and the server's own seconds: the search, the first hit's opening."""
    page.set_input_files("#image", str(image))
    page.set_input_files("#mask", str(mask))
    page.fill("#k", str(k))
    started = time.perf_counter()
    page.click("#run-query")
    page.wait_for_url("**/ui/queries/*")
    page.wait_for_function(FIRST_HIT_SHOWN, polling=5)
    shown = time.perf_counter() - started
    page.wait_for_function(ALL_TILES_SETTLED, polling=5)
    settled = time.perf_counter() - started
    search_ms = int(SERVER_SEARCH.search(page.inner_text(".meta")).group(1))
    open_ms = float(page.evaluate(FIRST_OPEN_MS))
    return shown, settled, search_ms / 1000, open_ms / 1000


def _processes_world(args, dataset, source, database, workdir, stack) -> tuple[str, str]:
    """One hospital on the real processes; (the encryptor's URL, a user token)."""
    import httpx

    from pecbir_harness.procs import Cluster

    cluster = stack.enter_context(Cluster(workdir / "cluster", own_redis=True))
    token = cluster.user_token()
    encryptor = stack.enter_context(
        httpx.Client(
            base_url=cluster.encryptor_url,
            headers={"authorization": f"Bearer {token}"},
            timeout=120,
        )
    )
    for row in database:
        answer = encryptor.post(
            "/v1/collections/brain/images",
            files={
                "image": ("slice.npy", _npy(dataset.images[row])),
                "mask": ("mask.npy", _npy(dataset.masks[row])),
            },
            data={"label": str(int(dataset.labels[row])), "train": "true"},
        )
        if answer.status_code != 202:
            raise RuntimeError(f"upload of row {row} failed: {answer.text}")
    gateway = stack.enter_context(
        httpx.Client(
            base_url=cluster.gateway_url,
            headers={"authorization": f"Bearer {cluster.token()}"},
            timeout=120,
        )
    )
    params = _model_params(args, source)
    trained = gateway.post("/v1/collections/brain/model/train", json=params)
    if trained.status_code != 202:
        raise RuntimeError(f"training refused: {trained.text}")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = gateway.get("/v1/collections/brain/model").json()
        if status["serving_version"] and status["n_vectors"] >= len(database):
            print(f"hospital-a: {len(database)} images, model trained and indexed", flush=True)
            return cluster.encryptor_url, token
        time.sleep(0.5)
    raise TimeoutError(f"the collection did not become searchable: {status}")


def run(args: argparse.Namespace) -> int:
    import contextlib
    import logging

    from pecbir_harness.browser import chromium
    from pecbir_harness.http import serve_in_thread

    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = args.out or Path(f"results/ui/bench-{args.stack}.json")
    dataset, source = _load(args)
    database, queries = _pick(dataset, args.images, 1, args.seed)
    queries = np.resize(queries, args.queries)  # repeated when the sample has fewer
    where = "three hospitals" if args.stack == "embedded" else "one hospital"
    print(f"{len(database)} images over {where}; {args.queries} queries (fold 1)")
    workdir = Path(tempfile.mkdtemp(prefix="pecbir-bench-ui-"))
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if args.stack == "embedded":
                system = _world(args, dataset, source, database, workdir)
                stack.callback(system.close)
                url = stack.enter_context(serve_in_thread(system.encryptor_app))
                token = system.user_token()
            else:
                url, token = _processes_world(args, dataset, source, database, workdir, stack)
            setup_s = time.perf_counter() - started
            files = []
            for i, row in enumerate(queries):
                image, mask = workdir / f"q{i}.png", workdir / f"q{i}-mask.png"
                plain = np.asarray(dataset.images[row])
                image.write_bytes(_png(plain if plain.dtype == np.uint8 else _to8(plain)))
                mask.write_bytes(_png(np.asarray(dataset.masks[row], dtype=np.uint8) * 255))
                files.append((image, mask))
            browser = stack.enter_context(chromium())
            context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=url)
            page = context.new_page()
            _sign_in(page, token)
            load_before = os.getloadavg()
            timed = [_query(page, image, mask, args.k) for image, mask in files]
            load_after = os.getloadavg()
            seconds = [t[0] for t in timed]
            tiles = page.locator(".tile").evaluate_all(
                "ts => ts.map(t => t.dataset.owner + ':' + t.dataset.state)"
            )
            shots = []
            if args.screenshots and args.stack == "embedded":
                shots = _take_screenshots(page, args.screenshots, files, token, args.k)
            context.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ms = np.asarray(seconds) * 1000
    result = {
        "what": "query submitted → first decrypted hit displayed, in headless chromium",
        "stack": args.stack,
        "stack_is": {
            "embedded": "every service in one process; the page over HTTP on loopback",
            "processes": "radosgw, Redis, Celery worker, uvicorn gateway/search/encryptor",
        }[args.stack],
        "source": source,
        "n_images": len(database),
        "hospitals": {
            "hospital-a": "pe (ours)",
            "hospital-b": "sealed, releases keys",
            "hospital-c": "pe, refuses",
        }
        if args.stack == "embedded"
        else {"hospital-a": "pe (ours)"},
        "n_queries": len(seconds),
        "k": args.k,
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "min_ms": round(float(ms.min()), 1),
        "max_ms": round(float(ms.max()), 1),
        "first_ms": round(float(ms[0]), 1),
        # every tile opened (or refused) and shown: the page is usable from the first hit on
        "all_tiles_p50_ms": round(1000 * float(np.median([t[1] for t in timed])), 1),
        # where the time goes, as the server measured it (medians over the same queries)
        "server_search_p50_ms": round(1000 * float(np.median([t[2] for t in timed])), 1),
        "server_first_open_p50_ms": round(1000 * float(np.nanmedian([t[3] for t in timed])), 1),
        "last_tiles": tiles,
        "setup_s": round(setup_s, 1),
        "machine": {
            "cpus": os.cpu_count(),
            # other jobs share this machine: its 1-minute load before and after the queries
            "load_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "screenshots": shots,
        "command": "pecbir bench-ui "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in sorted(vars(args).items())
            if k in {"images", "queries", "k", "n_components", "seed", "stack"}
        ),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(
        "| stack | queries | k | first hit p50 | p90 | min | max | all tiles p50 "
        "| server: search / first open p50 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.stack} | {len(seconds)} | {args.k} | {result['p50_ms']:.0f} ms "
        f"| {result['p90_ms']:.0f} ms | {result['min_ms']:.0f} ms | {result['max_ms']:.0f} ms "
        f"| {result['all_tiles_p50_ms']:.0f} ms | {result['server_search_p50_ms']:.0f} / "
        f"{result['server_first_open_p50_ms']:.0f} ms |"
    )
    print(f"1-minute load before/after: {result['machine']['load_1min_before_after']}")
    print(f"wrote {out}" + (f" and {len(shots)} screenshots" if shots else ""))
    return 0


def _to8(image: np.ndarray) -> np.ndarray:
    from pecore.cipher import to_uint8

    return to_uint8(image)[0]


def _draw_outline(page, image: Path, mask: Path) -> None:
    """Open the outline drawing on `image` and click an octagon around the tumour of `mask`."""
    from PIL import Image

    inside = np.asarray(Image.open(mask)) > 0
    rows, cols = np.nonzero(inside)
    cy, cx = rows.mean(), cols.mean()
    radius = max(np.ptp(rows), np.ptp(cols)) / 2 + 4
    page.set_input_files("#image", str(image))
    page.click("#draw-open")
    canvas = page.locator("#draw-canvas")
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()
    height, width = inside.shape
    for angle in np.linspace(0, 2 * np.pi, 10, endpoint=False):
        x = (cx + radius * np.cos(angle)) / width * box["width"]
        y = (cy + radius * np.sin(angle)) / height * box["height"]
        canvas.click(position={"x": float(x), "y": float(y)})


def _take_screenshots(page, folder: Path, files, token: str, k: int) -> list[str]:
    """login, query form, result (while it opens, and with "not released" tiles), cloud view,
    zoom, audit."""
    folder.mkdir(parents=True, exist_ok=True)
    shots: list[str] = []

    def shot(name: str) -> None:
        page.screenshot(path=str(folder / name))
        shots.append(name)

    page.context.clear_cookies()
    page.goto("/ui/")
    shot("login.png")
    _sign_in(page, token)
    page.select_option("#study", index=0)
    page.wait_for_function("() => document.getElementById('study-preview').naturalWidth > 0")
    shot("query-form.png")
    image, mask = files[0]
    _draw_outline(page, image, mask)
    shot("draw-outline.png")
    page.click("#draw-cancel")
    page.set_input_files("#image", str(image))
    page.set_input_files("#mask", str(mask))
    page.fill("#k", str(max(k, 15)))
    page.click("#run-query")
    page.wait_for_url("**/ui/queries/*")
    page.wait_for_function(FIRST_HIT_SHOWN)
    shot("results-opening.png")  # the first cases shown, the others still opening
    page.wait_for_function(ALL_TILES_SETTLED)
    page.wait_for_load_state("networkidle")
    shot("results.png")
    page.keyboard.press("c")
    page.wait_for_function(ALL_CLOUD_IMAGES_SHOWN)
    shot("results-cloud-view.png")
    page.keyboard.press("c")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_timeout(200)
    shot("case-enlarged.png")
    page.keyboard.press("Escape")
    montage = page.request.get(page.get_attribute("#export-png", "href"))
    (folder / "export-montage.png").write_bytes(montage.body())
    shots.append("export-montage.png")
    # the other hospitals only: hospital-b's cases (keys released), hospital-c's refused
    page.set_input_files("#image", str(image))
    page.set_input_files("#mask", str(mask))
    page.uncheck("input[name=hospital][value=hospital-a]")
    page.fill("#k", "10")
    page.click("#run-query")
    page.wait_for_url("**/ui/queries/*")
    page.wait_for_function(ALL_TILES_SETTLED)
    page.wait_for_load_state("networkidle")
    shot("results-not-released.png")
    page.goto("/ui/audit")
    shot("audit-trail.png")
    return shots
