"""`pecbir bench-pacs`: a real PACS (Orthanc) pushes N studies to the encryptor until every
image is searchable, over STOW-RS and over DIMSE C-STORE (issue 14).

One study is one MR slice and its DICOM SEG (synthetic, `pecore.datasets.make_synthetic`,
12-bit). The encryptor runs in its own process with an embedded cloud behind it (one
process does the encryptor's and the cloud's work), served over HTTP and DIMSE; a model is
trained first so that pushed images become searchable. The cloud indexes on a worker thread
of that process, after the upload is answered, as a deployment's indexer workers do
(`--cloud-indexing eager` indexes inside the upload request instead, as the benchmark did
before). Orthanc (Debian's, with its
DICOMweb plugin) holds the studies and pushes them as one job per transport with its own
clients (``/dicom-web/servers/pecbir/stow``, ``/modalities/pecbir/store``). Measured per
transport: instances per second from the job's start until the last image is searchable,
p50/p95 of each image's push-to-searchable time (from the job's start), the job's time, and
the encryptor process's peak RSS. Prints a table and writes JSON under results/dicom/.
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
from pathlib import Path
from typing import Any

# The child: an embedded system with a trained model, its encryptor on HTTP and DIMSE.
_CHILD = """
import io, json, sys
from pathlib import Path
import numpy as np
from pecbir_encryptor.credentials import PacsCredentials
from pecbir_encryptor.dimse import DimseConfig, start_scp
from pecbir_harness.embedded import EmbeddedSystem, served
from pecbir_harness.procs import free_port
from pecore.datasets import make_synthetic
from pecore.keys import MasterKey
root, size, model = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
background = sys.argv[4] == "background"
def npy(a):
    b = io.BytesIO(); np.save(b, a, allow_pickle=False); return b.getvalue()
with EmbeddedSystem(root, master=MasterKey.from_seed(3), background_tasks=background) as system:
    seed = make_synthetic(n_images=24, size=size, seed=99)
    for image, mask, label in zip(seed.images, seed.masks, seed.labels):
        system.encryptor.post("/v1/collections/bench/images",
            files={"image": ("x.npy", npy(image)), "mask": ("m.npy", npy(mask))},
            data={"label": str(int(label)), "train": "true"}).raise_for_status()
    system.gateway.post("/v1/collections/bench/model/train", json=model).raise_for_status()
    system.wait_searchable("bench", 24, timeout=600)
    settings = system.encryptor_app.state.context.settings
    _, key = PacsCredentials(settings.pacs_credentials, system.tenant).create("orthanc-bench")
    port = free_port()
    scp = start_scp(system.encryptor_app.state.encryptor, DimseConfig(port=port,
        host="127.0.0.1", ae_title="PECBIR", allowed=frozenset({"ORTHANC"}),
        collection="bench", max_associations=4), max_pixels=1024 * 1024)
    with served(system.encryptor_app) as url:
        print(json.dumps({"url": url, "dimse_port": port, "api_key": key,
                          "token": system.user_token()}), flush=True)
        sys.stdin.read()
    scp.shutdown()
"""
# The service's default model where it sets what indexing costs, trained on fewer patches.
MODEL = {
    "n_components": 64,
    "n_regions": 8,
    "patch_size": 9,
    "radius": 16,
    "n_train_patches": 5000,
    "dim": 2,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-pacs",
        help="Orthanc → encryptor → searchable over STOW-RS and DIMSE (table + JSON)",
    )
    parser.add_argument("--studies", type=int, default=500, help="studies per transport")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each slice")
    parser.add_argument("--transports", default="stow,dimse", help="stow, dimse or both")
    parser.add_argument(
        "--cloud-indexing",
        choices=("background", "eager"),
        default="background",
        help="the embedded cloud indexes on a worker thread (as a deployment) or in the request",
    )
    parser.add_argument("--out", type=Path, default=Path("results/dicom/pacs.json"))
    parser.set_defaults(func=run)


def _studies(n: int, size: int, seed: int) -> list[tuple[bytes, bytes, str]]:
    """(image file, SEG file, SOP Instance UID) of `n` synthetic studies."""
    import numpy as np

    from pecbir_harness.dicom import dicom_bytes, make_mr, make_seg
    from pecore.datasets import make_synthetic

    data = make_synthetic(n_images=n, size=size, seed=seed)
    names = {1: "meningioma", 2: "glioma", 3: "pituitary"}
    studies = []
    for image, mask, label in zip(data.images, data.masks, data.labels, strict=True):
        mr = make_mr((image.astype(np.uint16) << 4), bits_stored=12)
        seg = make_seg(mask, mr, label=names[int(label)])
        studies.append((dicom_bytes(mr), dicom_bytes(seg), str(mr.SOPInstanceUID)))
    return studies


def _percentile(values: list[float], q: float) -> float:
    from pecbir_harness.workload import percentile

    return round(percentile(values, q), 2)


def measure(pacs, child: dict, transport: str, studies, pid: int) -> dict[str, Any]:
    """Push `studies` (already in Orthanc) over `transport`; the row of the table.

    Parameters
    ----------
    pacs
        The running Orthanc (`pecbir_harness.orthanc.Orthanc`).
    child
        The encryptor process's URL, token.
    transport
        "stow" or "dimse".
    studies
        (Orthanc study id, image id in the cloud) pairs.
    pid
        The encryptor process (RSS sampled).
    """
    import httpx
    import psutil

    process = psutil.Process(pid)
    peak, stop = [process.memory_info().rss], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    path = "/dicom-web/servers/pecbir/stow" if transport == "stow" else "/modalities/pecbir/store"
    results: dict[str, Any] = {}
    # CPU seconds of the encryptor process (and its embedded cloud): what ingest costs, much
    # less dependent on the other load of a shared machine than the wall-clock rate.
    cpu_before = sum(process.cpu_times()[:2])
    started = time.monotonic()

    def push() -> None:
        results["job"] = pacs.run_job(path, [s for s, _ in studies], timeout_s=3600)
        results["job_s"] = time.monotonic() - started

    pusher = threading.Thread(target=push)
    pusher.start()
    # Checked in push order, each sweep stopping at the first image not yet searchable: the
    # encryptor takes them in that order, and a poll of every image every second would load
    # the very process being measured (an image out of order is seen one sweep late at most).
    order = [image_id for _, image_id in studies]
    searchable: dict[str, float] = {}
    http = httpx.Client(
        base_url=child["url"], headers={"authorization": f"Bearer {child['token']}"}, timeout=60
    )
    while len(searchable) < len(order) and time.monotonic() - started < 3600:
        time.sleep(0.5)
        for image_id in order[len(searchable) :]:
            answer = http.get(f"/v1/collections/bench/images/{image_id}/status")
            if answer.status_code != 200 or answer.json().get("state") != "searchable":
                break
            searchable[image_id] = time.monotonic() - started
        if not pusher.is_alive() and results.get("job", {}).get("State") == "Failure":
            break
    cpu_s = sum(process.cpu_times()[:2]) - cpu_before
    pusher.join()
    stop.set()
    sampler.join()
    latencies = sorted(searchable.values())
    last = latencies[-1] if latencies else float("nan")
    instances = 2 * len(searchable)
    return {
        "transport": transport,
        "studies": len(studies),
        "instances": 2 * len(studies),
        "job_state": results["job"]["State"],
        "job_s": round(results["job_s"], 1),
        "searchable": len(searchable),
        "instances_per_s": round(instances / last, 2) if latencies else 0.0,
        "push_to_searchable_p50_s": _percentile(latencies, 50) if latencies else None,
        "push_to_searchable_p95_s": _percentile(latencies, 95) if latencies else None,
        "encryptor_peak_rss_mib": round(peak[0] / 2**20, 1),
        "encryptor_cpu_ms_per_instance": round(1000 * cpu_s / max(instances, 1), 1),
        # the machine is shared: its 1-minute load when the row ends, beside the row
        "load_1min": round(os.getloadavg()[0], 2),
    }


def run(args: argparse.Namespace) -> int:
    import httpx

    from pecbir_contracts.layout import image_id_for
    from pecbir_encryptor.core import Encryptor
    from pecbir_harness.orthanc import orthanc
    from pecore.keys import MasterKey

    transports = [t for t in args.transports.split(",") if t]
    # The child's key (seed 3): the cloud id of each SOP Instance UID, as the encryptor makes it.
    ids = Encryptor(MasterKey.from_seed(3), httpx.Client())
    rows = []
    with tempfile.TemporaryDirectory(prefix="pecbir-bench-pacs-") as tmp:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                f"{tmp}/system",
                str(args.size),
                json.dumps(MODEL),
                args.cloud_indexing,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            info = json.loads(child.stdout.readline())
            with orthanc(
                Path(tmp) / "orthanc",
                stow_url=f"{info['url']}/dicomweb/bench/",
                stow_user="orthanc-bench",
                stow_password=info["api_key"],
                scp=("PECBIR", info["dimse_port"]),
            ) as pacs:
                for index, transport in enumerate(transports):
                    studies = []
                    for image, seg, uid in _studies(args.studies, args.size, seed=index):
                        study = pacs.upload(image)["ParentStudy"]
                        pacs.upload(seg)
                        image_id = image_id_for("hospital-a", "bench", ids.opaque_id_for(uid))
                        studies.append((study, image_id))
                    row = measure(pacs, info, transport, studies, child.pid)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            child.stdin.close()
            child.terminate()
            child.wait(timeout=60)
    header = (
        "| transport | studies | instances | job | job s | searchable | instances/s "
        "| push→searchable p50 s | p95 s | encryptor peak RSS MiB | encryptor CPU ms/instance "
        "| load 1 min |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['transport']} | {r['studies']} | {r['instances']} | {r['job_state']} "
            f"| {r['job_s']} | {r['searchable']} | {r['instances_per_s']} "
            f"| {r['push_to_searchable_p50_s']} | {r['push_to_searchable_p95_s']} "
            f"| {r['encryptor_peak_rss_mib']} | {r['encryptor_cpu_ms_per_instance']} "
            f"| {r['load_1min']} |"
        )
    table = "\n".join(lines)
    print(table)
    command = (
        f"pecbir bench-pacs --studies {args.studies} --size {args.size} "
        f"--transports {args.transports} --cloud-indexing {args.cloud_indexing}"
    )
    result = {
        "command": command,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_1min": os.getloadavg()[0],
        },
        "model": MODEL,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# Orthanc → encryptor → searchable\n\n`{command}`; load "
        f"{result['machine']['load_1min']:.2f} on {result['machine']['cpus']} cores.\n\n"
        f"{table}\n"
    )
    print(f"wrote {args.out}")
    return 0
