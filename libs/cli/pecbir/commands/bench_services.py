"""`pecbir bench-services`: latency and throughput of the running services (real processes).

Starts Redis (or an empty database of the machine's Redis), Ceph radosgw (memstore), one
Celery worker and uvicorn gateway + search on loopback, then measures:
- upload → searchable: gateway upload of a cipher image until the search service serves it;
- full query through the gateway (cipher query PNG + mask → hits): p50/p99, and QPS with
  concurrent clients;
- the k-NN step alone over all vectors (server-side timing inside the search service, and the
  same `VectorIndex` in-process).
Owner-side encryption is done beforehand in this process and timed separately. Prints a table,
writes JSON and markdown under results/bench/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pecbir_contracts import routes
from pecbir_harness.workload import percentile

TARGETS = {"query_p50_ms": 200.0, "knn_p99_ms": 2.0, "upload_to_searchable_p50_s": 1.5}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-services", help="benchmark the services as real processes (table + JSON)"
    )
    parser.add_argument("--images", type=int, default=3064, help="images in the collection")
    parser.add_argument("--train", type=int, default=500, help="templates the model is fit on")
    parser.add_argument("--probes", type=int, default=40, help="uploads timed to searchable")
    parser.add_argument("--queries", type=int, default=200, help="sequential timed queries")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for QPS")
    parser.add_argument("--n-components", type=int, default=16)
    parser.add_argument("--n-train-patches", type=int, default=60_000)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/bench/services.json"))
    parser.set_defaults(func=run)


def _load(args):
    from pecore.datasets import default_data_path, load_figshare, make_synthetic

    if not args.synthetic and default_data_path().is_file():
        data = load_figshare(cache_dir=Path("cache"))
        return data, "figshare"
    return make_synthetic(n_images=args.images, size=256, seed=0), "synthetic"


def run(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    from pecbir_harness.procs import Cluster
    from pecbir_harness.workload import seal_for_upload
    from pecore.keys import MasterKey

    logging.getLogger("httpx").setLevel(logging.WARNING)
    dataset, source = _load(args)
    n = min(args.images, len(dataset))
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(dataset))[:n]
    master = MasterKey.generate()
    secret = master.secret.get_secret_value()
    jobs = [
        (secret, dataset.images[r], dataset.masks[r], f"bench-{int(r):05d}", int(dataset.labels[r]))
        for r in rows
    ]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        sealed = list(
            tqdm(
                pool.map(seal_for_upload, jobs, chunksize=8),
                total=n,
                desc="owner: encrypt",
                unit="img",
            )
        )
    seal_seconds = [s[3] for s in sealed]
    n_train = min(args.train, n - args.probes - 1)
    bulk = sealed[n_train : n - args.probes]
    probes = sealed[n - args.probes :]
    results: dict[str, object] = {
        "source": source,
        "n_images": n,
        "n_train": n_train,
        "model": {"n_components": args.n_components, "n_train_patches": args.n_train_patches},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "store": "Ceph radosgw S3 over HTTP (memstore OSD)",
        "workers": "1 Celery worker, solo pool",
        "encrypt_s_per_image_mean": statistics.fmean(seal_seconds),
    }
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp), encryptor=False) as cluster:
        client = httpx.Client(
            base_url=cluster.gateway_url,
            headers={"authorization": f"Bearer {cluster.token()}"},
            timeout=120,
        )

        def upload(item) -> str:
            cipher, mask, meta, _ = item
            answer = client.post(
                routes.GATEWAY_IMAGES.format(collection="bench"),
                files={
                    "cipher": ("c.png", cipher),
                    "mask": ("m.png", mask),
                    "metadata": (None, meta),
                },
            )
            if answer.status_code != 202:
                raise RuntimeError(f"upload failed: {answer.status_code} {answer.text}")
            return answer.json()["image_id"]

        def model_status() -> dict:
            return client.get(routes.GATEWAY_MODEL.format(collection="bench")).json()

        def wait_vectors(count: int, what: str, timeout: float = 3600) -> None:
            bar = tqdm(total=count, desc=what, unit="vec")
            deadline = time.monotonic() + timeout
            while True:
                status = model_status()
                held = (
                    status["n_vectors"]
                    if status["serving_version"] == status["indexing_version"]
                    else 0
                )
                bar.n = min(held, count)
                bar.refresh()
                if held >= count:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"search holds {status}, expected {count}")
                time.sleep(0.5)
            bar.close()

        with ThreadPoolExecutor(2) as pool:
            list(tqdm(pool.map(upload, sealed[:n_train]), total=n_train, desc="upload templates"))
        started = time.perf_counter()
        params = {"n_components": args.n_components, "n_train_patches": args.n_train_patches}
        trained = client.post(routes.GATEWAY_MODEL_TRAIN.format(collection="bench"), json=params)
        version = trained.json()["version"]
        while (
            client.get(
                routes.GATEWAY_MODEL_VERSION.format(collection="bench", version=version)
            ).json()["state"]
            == "queued"
        ):
            time.sleep(1.0)
        results["train_s"] = time.perf_counter() - started
        wait_vectors(n_train, "re-index")
        results["train_and_reindex_s"] = time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(tqdm(pool.map(upload, bulk), total=len(bulk), desc="upload bulk"))
        wait_vectors(n_train + len(bulk), "index bulk")
        results["bulk_index_images_per_s"] = len(bulk) / (time.perf_counter() - started)

        latencies = []
        for item in tqdm(probes, desc="upload → searchable", unit="img"):
            started = time.perf_counter()
            image_id = upload(item)
            while True:
                state = client.get(
                    routes.GATEWAY_IMAGE_STATUS.format(collection="bench", image_id=image_id)
                ).json()
                if state["state"] == "searchable":
                    break
                if state["state"] == "failed":
                    raise RuntimeError(f"indexing failed: {state}")
                time.sleep(0.01)
            latencies.append(time.perf_counter() - started)
        results["upload_to_searchable_s"] = {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "n": len(latencies),
        }
        total = model_status()["n_vectors"]
        results["n_vectors"] = total

        queries = [sealed[i] for i in rng.choice(n, size=args.queries, replace=True)]

        def query(item) -> tuple[float, dict]:
            cipher, mask, _, _ = item
            started = time.perf_counter()
            answer = client.post(
                routes.GATEWAY_SEARCH.format(collection="bench"),
                files={"cipher": ("q.png", cipher), "mask": ("m.png", mask)},
                data={"k": "10"},
            )
            elapsed = time.perf_counter() - started
            if answer.status_code != 200:
                raise RuntimeError(f"query failed: {answer.status_code} {answer.text}")
            return elapsed, answer.json()["timings"]

        for item in queries[:5]:
            query(item)  # warm-up
        timed = [query(item) for item in tqdm(queries, desc="queries (sequential)")]
        full = [t * 1000 for t, _ in timed]
        knn_server = [timings["knn_ms"] for _, timings in timed]
        featurise = [timings["featurise_ms"] for _, timings in timed]
        results["query_ms"] = {"p50": percentile(full, 50), "p99": percentile(full, 99)}
        results["query_featurise_ms"] = {"p50": percentile(featurise, 50)}
        results["knn_server_ms"] = {
            "p50": percentile(knn_server, 50),
            "p99": percentile(knn_server, 99),
            "n_vectors": total,
        }
        done = 0
        lock = threading.Lock()
        started = time.perf_counter()

        def client_loop(offset: int) -> None:
            nonlocal done
            for item in queries[offset :: args.clients]:
                query(item)
                with lock:
                    done += 1

        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client_loop, range(args.clients)))
        results["qps"] = {"clients": args.clients, "qps": done / (time.perf_counter() - started)}
        results["knn_inprocess_ms"] = _knn_in_process(cluster)
    results["targets"] = TARGETS
    _report(results, args.out)
    return 0


def _knn_in_process(cluster) -> dict[str, float]:
    """The same VectorIndex the search service uses, loaded with the stored vectors."""
    from pecbir_contracts.layout import CollectionLayout
    from pecbir_contracts.records import FeatureRecord, read_current_version
    from pecbir_search.index import ExactVectorIndex as VectorIndex

    store = cluster.s3.open()
    layout = CollectionLayout(cluster.tenant, "bench")
    version = read_current_version(store, layout)
    vectors = []
    index = None
    for key in store.list(layout.features_prefix(version)):
        record = FeatureRecord.from_bytes(store.get(key))
        index = index or VectorIndex(version, record.vector.shape[0])
        index.upsert(key, record.vector, record.label)
        vectors.append(record.vector)
    vectors = np.asarray(vectors)
    times = []
    for i in range(3000):
        started = time.perf_counter()
        index.search(vectors[i % len(vectors)], 10)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50": percentile(times, 50), "p99": percentile(times, 99), "n_vectors": len(index)}


def _report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    up, q, knn, knn_local = (
        results["upload_to_searchable_s"],
        results["query_ms"],
        results["knn_server_ms"],
        results["knn_inprocess_ms"],
    )
    rows = [
        ("upload → searchable p50 / p95", f"{up['p50']:.3f} s / {up['p95']:.3f} s", "p50 ≤ 1.5 s"),
        (
            "full query via gateway p50 / p99",
            f"{q['p50']:.1f} ms / {q['p99']:.1f} ms",
            "p50 ≤ 200 ms",
        ),
        (
            "  of which query featurisation p50",
            f"{results['query_featurise_ms']['p50']:.1f} ms",
            "",
        ),
        (f"QPS ({results['qps']['clients']} clients)", f"{results['qps']['qps']:.1f}", ""),
        (
            f"k-NN step in the service p50 / p99 ({knn['n_vectors']} vectors)",
            f"{knn['p50']:.3f} ms / {knn['p99']:.3f} ms",
            "p99 ≤ 2 ms",
        ),
        (
            "k-NN step in-process p50 / p99",
            f"{knn_local['p50']:.3f} ms / {knn_local['p99']:.3f} ms",
            "p99 ≤ 2 ms",
        ),
        ("bulk indexing throughput", f"{results['bulk_index_images_per_s']:.1f} images/s", ""),
        ("model training (fit)", f"{results['train_s']:.1f} s on {results['n_train']}", ""),
        ("owner-side encryption", f"{results['encrypt_s_per_image_mean'] * 1000:.0f} ms/image", ""),
    ]
    lines = [
        f"# Services benchmark ({results['source']}, {results['n_images']} images, "
        f"{results['machine']['cpus']} CPUs; {results['store']}; {results['workers']})",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")
