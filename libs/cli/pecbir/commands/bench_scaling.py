"""`pecbir bench-scaling`: how the cloud side scales (results/scaling/, JSON + PNG each).

- `search`: k-NN latency (p50/p99) of the search service's own index (`pecbir_search.index.
  VectorIndex`) against the number of vectors, next to faiss `IndexFlatL2` on the same data in
  the same run (and a numpy BLAS alternative); the rebuild time of each index by upserts and
  the cost of one insert at that fill.
- `indexing`: images/s of the indexer's task body (`pecbir_indexer.work.index_image`) with 1
  and 2 worker processes over a filesystem store, and the per-image cost split
  (decode, patches, Fisher vector, store).
- `memory`: bytes per indexed image held by the search service and by the object store
  (real images protected by the encryptor's code, a real feature record), and what a
  10-million-image consortium would need.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

OUT = Path("results/scaling")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench-scaling", help="scaling benchmarks (JSON + PNG)")
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    search = targets.add_parser("search", help="k-NN latency vs number of vectors, vs faiss")
    search.add_argument(
        "--sizes", default="1000,10000,100000,1000000", help="comma-separated vector counts"
    )
    search.add_argument("--dim", type=int, default=10, help="projected dimension (CFML dim)")
    search.add_argument("--queries", type=int, default=300, help="queries per round")
    search.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--out", type=Path, default=OUT / "search_latency.json")
    search.set_defaults(func=run_search)
    memory = targets.add_parser("memory", help="bytes per indexed image (search, object store)")
    memory.add_argument("--images", type=int, default=40, help="real images to measure")
    memory.add_argument("--fit-images", type=int, default=120, help="images to fit a model on")
    memory.add_argument("--n-components", type=int, default=64, help="GMM components D")
    memory.add_argument("--consortium", type=int, default=10_000_000)
    memory.add_argument("--out", type=Path, default=OUT / "memory.json")
    memory.set_defaults(func=run_memory)
    indexing = targets.add_parser("indexing", help="indexer throughput, 1 and 2 processes")
    indexing.add_argument("--images", type=int, default=60, help="images indexed per run")
    indexing.add_argument("--fit-images", type=int, default=120)
    indexing.add_argument("--n-components", type=int, default=64, help="GMM components D")
    indexing.add_argument("--processes", default="1,2")
    indexing.add_argument("--out", type=Path, default=OUT / "indexing.json")
    indexing.set_defaults(func=run_indexing)


def _machine() -> dict[str, object]:
    import os

    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "numpy": np.__version__,
    }


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


# -- search latency --------------------------------------------------------------------------


def _fill_by_upserts(vectors: np.ndarray, ids: list[str]):
    """A `VectorIndex` filled the way a restarted replica rebuilds it, and the seconds it took.

    Only the index side of a rebuild: the replica also reads one feature record per image from
    the object store.
    """
    from pecbir_search.index import ExactVectorIndex as VectorIndex

    index = VectorIndex("v0001", vectors.shape[1])
    started = time.perf_counter()
    for image_id, vector in zip(ids, vectors, strict=True):
        index.upsert(image_id, vector, None)
    return index, time.perf_counter() - started


def _upsert_cost(index, dim: int, rng: np.random.Generator, count: int = 300) -> float:
    """Mean seconds of one `upsert` of a new image at the index's current fill."""
    fresh = rng.standard_normal((count, dim)).astype(np.float32)
    started = time.perf_counter()
    for i in range(count):
        index.upsert(f"{'f' * 24}{i:08x}", fresh[i], None)
    return (time.perf_counter() - started) / count


class BlasExpansionKnn:
    """The alternative measured against the service's kernel: exact k-NN by BLAS.

    `|x|^2 - 2 q.x + |q|^2` as one float32 matrix-vector product over an augmented,
    column-major matrix (rows `x` and `|x|^2`; query `-2q` and 1), a candidate border wide enough
    for the expansion's rounding error, then the direct form and a stable sort on the candidates
    only: the same neighbours, ties in database order.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        n, dim = vectors.shape
        self.vectors = vectors
        self.augmented = np.empty((dim + 1, n), np.float32)
        self.augmented[:dim] = vectors.T
        self.augmented[dim] = np.einsum("ij,ij->i", vectors, vectors)
        self.max_norm = float(np.sqrt(self.augmented[dim].max()))
        # |expanded - direct| <= 2 gamma_(dim+2) (|x| + |q|)^2, gamma_m = m u / (1 - m u)
        gamma = (dim + 2) * 2.0**-24 / (1 - (dim + 2) * 2.0**-24)
        self.error_factor = 2 * gamma

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        query = np.asarray(query, np.float32)
        n = self.vectors.shape[0]
        weights = np.concatenate((query * np.float32(-2), np.ones(1, np.float32)))
        expanded = weights @ self.augmented  # |x|^2 - 2 q.x  (|q|^2 is the same for all rows)
        margin = 2 * self.error_factor * (self.max_norm + float(np.sqrt(query @ query))) ** 2
        # An upper bound of the k-th smallest from a sample keeps the full partition off n.
        sample = expanded[:: max(1, n // (16 * k))]
        bound = np.partition(sample, k - 1)[k - 1] if sample.shape[0] >= k else np.inf
        candidates = np.flatnonzero(expanded <= bound + margin)
        kth = np.partition(expanded[candidates], k - 1)[k - 1]
        candidates = candidates[expanded[candidates] <= kth + margin]
        diff = self.vectors[candidates] - query
        direct = np.einsum("ij,ij->i", diff, diff)
        return candidates[np.argsort(direct, kind="stable")[:k]]


def measure_search(
    sizes: list[int],
    dim: int,
    n_queries: int,
    k: int,
    seed: int = 0,
    progress: bool = True,
    repeats: int = 3,
) -> list[dict[str, object]]:
    """Per size: p50/p99 (median over `repeats` rounds of `n_queries`) of the service's index,
    faiss `IndexFlatL2` and the BLAS-expansion alternative, interleaved query by query; the
    rebuild time by upserts and the marginal upsert cost."""
    import faiss
    import threadpoolctl
    from tqdm import tqdm

    faiss.omp_set_num_threads(1)  # one query per request thread, as in the service
    threadpoolctl.threadpool_limits(1)  # OMP_NUM_THREADS=1, as the deployment sets it
    rng = np.random.default_rng(seed)
    rows = []
    for n in tqdm(sizes, desc="sizes", disable=not progress):
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        ids = [f"{i:032x}" for i in range(n)]
        index, rebuild_s = _fill_by_upserts(vectors, ids)
        flat = faiss.IndexFlatL2(dim)
        flat.add(vectors)
        blas = BlasExpansionKnn(vectors)
        index.search(vectors[0], k)  # compile the kernel outside the timings
        rounds: dict[str, list[dict[str, float]]] = {"service": [], "faiss": [], "blas": []}
        agree_faiss = agree_blas = 0
        for _ in range(repeats):
            queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
            times: dict[str, list[float]] = {name: [] for name in rounds}
            for query in queries:  # interleaved: all see the same machine load
                started = time.perf_counter()
                found, _d, _l = index.search(query, k)
                times["service"].append(time.perf_counter() - started)
                started = time.perf_counter()
                _fd, by_faiss = flat.search(query[None, :], k)
                times["faiss"].append(time.perf_counter() - started)
                started = time.perf_counter()
                by_blas = blas.search(query, k)
                times["blas"].append(time.perf_counter() - started)
                rows_found = [int(i, 16) for i in found]
                agree_faiss += len(set(rows_found) & set(by_faiss[0].tolist()))
                agree_blas += int(rows_found == by_blas.tolist())
            for name, seconds in times.items():
                rounds[name].append(_percentiles(seconds))
        service, flat_stats, blas_stats = (_median_rounds(rounds[name]) for name in rounds)
        rows.append(
            {
                "n_vectors": n,
                "service": service,
                "faiss_flat_l2": flat_stats,
                "numpy_blas_expansion": blas_stats,
                "ratio_p50": service["p50_ms"] / flat_stats["p50_ms"],
                "ratio_p99": service["p99_ms"] / flat_stats["p99_ms"],
                "same_neighbours": agree_faiss / (repeats * n_queries * min(k, n)),
                "blas_identical_answers": agree_blas / (repeats * n_queries),
                "rebuild_s": rebuild_s,
                "rebuild_upserts_per_s": n / rebuild_s,
                "upsert_us": _upsert_cost(index, dim, rng) * 1e6,
                "matrix_mb": vectors.nbytes / 2**20,
            }
        )
    return rows


def _median_rounds(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.median([r[key] for r in rounds])) for key in rounds[0]}


def run_search(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = measure_search(sizes, args.dim, args.queries, args.k, repeats=args.repeats)
    target = 1.5
    result = {
        "benchmark": "search k-NN latency vs indexed vectors",
        "dim": args.dim,
        "k": args.k,
        "queries_per_round": args.queries,
        "rounds": args.repeats,
        "statistic": "p50 and p99 of each round, median over the rounds",
        "data": "synthetic float32 N(0,1) vectors of the projected dimension",
        "service_code": "pecbir_search.index.VectorIndex.search (exact, numba kernel, "
        "direct form, stable ties)",
        "reference": "faiss.IndexFlatL2 (exact), 1 OpenMP thread, single-query calls",
        "alternative": "BlasExpansionKnn: float32 BLAS matvec of the expanded form, exact "
        "border re-ranked in the direct form (1 BLAS thread)",
        "index_filled_by": "VectorIndex.upsert, one vector at a time (timed: rebuild_s)",
        "target_ratio": target,
        "meets_target": all(r["ratio_p50"] <= target for r in rows),
        "machine": _machine(),
        "rows": rows,
    }
    _write(args.out, result)
    print(
        f"{'vectors':>10} {'svc p50':>9} {'svc p99':>9} {'faiss p50':>10} {'faiss p99':>10}"
        f" {'blas p50':>9} {'ratio':>6} {'upsert':>8} {'rebuild':>8}"
    )
    for r in rows:
        s, f, b = r["service"], r["faiss_flat_l2"], r["numpy_blas_expansion"]
        print(
            f"{r['n_vectors']:>10} {s['p50_ms']:>8.4f}m {s['p99_ms']:>8.4f}m "
            f"{f['p50_ms']:>9.4f}m {f['p99_ms']:>9.4f}m {b['p50_ms']:>8.4f}m "
            f"×{r['ratio_p50']:>5.2f} {r['upsert_us']:>6.1f}µs {r['rebuild_s']:>7.2f}s"
        )
    _plot_search(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _plot_search(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = [r["n_vectors"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = (
        ("service", "search service", "C0"),
        ("faiss_flat_l2", "faiss", "C1"),
        ("numpy_blas_expansion", "numpy BLAS expansion", "C2"),
    )
    for key, label, color in series:
        left.plot(n, [r[key]["p50_ms"] for r in rows], "o-", color=color, label=f"{label} p50")
        left.plot(n, [r[key]["p99_ms"] for r in rows], "s--", color=color, label=f"{label} p99")
    left.set(xscale="log", yscale="log", xlabel="indexed vectors", ylabel="latency per query (ms)")
    left.set_title(f"exact k-NN, dim={result['dim']}, k={result['k']}")
    left.legend()
    left.grid(True, which="both", alpha=0.3)
    right.plot(n, [r["ratio_p50"] for r in rows], "o-", label="p50 ratio")
    right.plot(n, [r["ratio_p99"] for r in rows], "s--", label="p99 ratio")
    right.axhline(result["target_ratio"], color="red", lw=1, label="target")
    right.set(xscale="log", xlabel="indexed vectors", ylabel="service / faiss")
    right.set_title("slowdown against faiss IndexFlatL2")
    right.legend()
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- memory ----------------------------------------------------------------------------------


def search_bytes_per_vector(n: int, dim: int) -> dict[str, float]:
    """Python-heap bytes one vector costs in `VectorIndex` (filled by real upserts)."""
    import tracemalloc

    from pecbir_search.index import ExactVectorIndex as VectorIndex

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    index = VectorIndex("v0001", dim)
    for i, vector in enumerate(vectors):
        # The id string is made here: in the service it arrives with the event and is kept.
        index.upsert(f"{i:032x}", vector, 1)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return {
        "n": n,
        "bytes_per_vector": total / n,
        "matrix_bytes_per_vector": index.nbytes / n,
        "capacity": index.capacity,
    }


def store_bytes_per_image(
    n_images: int, fit_images: int, n_components: int
) -> tuple[dict[str, float], dict[str, object]]:
    """Mean object sizes per image as the services write them, from real images."""
    import httpx

    from pecbir_contracts.png import encode_png
    from pecbir_contracts.records import FeatureRecord
    from pecbir_encryptor.core import Encryptor
    from pecore.datasets import load_figshare
    from pecore.keys import MasterKey
    from pecore.pipeline import CBIRPipeline

    data = load_figshare()
    encryptor = Encryptor(MasterKey.from_seed(3), httpx.Client(base_url="http://unused"))
    sizes: dict[str, list[int]] = {"cipher.png": [], "mask.png": [], "meta.json": []}
    for i in range(n_images):
        protected = encryptor.protect(
            np.asarray(data.images[i]), data.masks[i], opaque_id=f"bench-{i:08d}", label=1
        )
        sizes["cipher.png"].append(len(encode_png(protected.cipher)))
        sizes["mask.png"].append(len(encode_png(protected.mask)))
        sizes["meta.json"].append(len(protected.metadata.model_dump_json()))
    # A model fitted on a small sample gives the real Fisher-vector length for this D.
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(data.images), size=fit_images, replace=False)
    pipeline = CBIRPipeline(n_components=n_components, n_train_patches=40_000, n_jobs=1)
    started = time.perf_counter()
    pipeline.fit(
        [np.asarray(data.images[i]) for i in chosen],
        [data.masks[i] for i in chosen],
        np.asarray(data.labels)[chosen],
    )
    fit_s = time.perf_counter() - started
    fisher = pipeline.fisher_vectors([np.asarray(data.images[0])], [data.masks[0]])
    vector = pipeline.project(fisher)[0]
    record = FeatureRecord("v0001", vector, 1).to_bytes()
    sizes["features.npz"] = [len(record)]
    model = __import__("io").BytesIO()
    pipeline.save(model)
    means = {name: float(np.mean(v)) for name, v in sizes.items()}
    info = {
        "fisher_vector_length": int(fisher.shape[1]),
        "projected_dim": int(vector.shape[0]),
        "model_npz_bytes": len(model.getvalue()),
        "fit_images": fit_images,
        "fit_seconds": fit_s,
    }
    return means, info


def run_memory(args: argparse.Namespace) -> int:
    search = search_bytes_per_vector(20_000, 10)
    store, info = store_bytes_per_image(args.images, args.fit_images, args.n_components)
    per_image_store = sum(store.values())
    n = args.consortium
    # Vectors: the worst case of the doubling growth policy is 2× the rows in use.
    matrix_worst = 2 * search["matrix_bytes_per_vector"]
    other = search["bytes_per_vector"] - search["matrix_bytes_per_vector"]
    result = {
        "benchmark": "memory per indexed image",
        "search_service": search,
        "object_store_bytes_per_image": store,
        "object_store_total_per_image": per_image_store,
        "model": info,
        "consortium": {
            "images": n,
            "search_gib_per_replica": n * search["bytes_per_vector"] / 2**30,
            "search_gib_per_replica_worst_growth": n * (matrix_worst + other) / 2**30,
            "object_store_gib": n * per_image_store / 2**30,
            "object_store_gib_during_reindex": n
            * (per_image_store + store["features.npz"])
            / 2**30,
        },
        "machine": _machine(),
    }
    _write(args.out, result)
    print(f"search: {search['bytes_per_vector']:.0f} B per vector (heap, incl. ids and map)")
    for name, size in store.items():
        print(f"store: {name:<14} {size / 1024:8.1f} KiB per image")
    print(f"store: total          {per_image_store / 1024:8.1f} KiB per image")
    for key, value in result["consortium"].items():
        print(f"{n:,} images: {key} = {value:,.1f}" if key != "images" else "", end="")
        print() if key != "images" else None
    _plot_memory(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _plot_memory(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = result["object_store_bytes_per_image"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(list(store), [v / 1024 for v in store.values()], color="C0")
    left.bar(["search (RAM)"], [result["search_service"]["bytes_per_vector"] / 1024], color="C1")
    left.set(ylabel="KiB per image", title="bytes per indexed image")
    left.tick_params(axis="x", rotation=20)
    consortium = result["consortium"]
    labels = ["search RAM\nper replica", "object store", "store during\nre-index"]
    values = [
        consortium["search_gib_per_replica_worst_growth"],
        consortium["object_store_gib"],
        consortium["object_store_gib_during_reindex"],
    ]
    right.bar(labels, values, color=["C1", "C0", "C0"])
    right.set(ylabel="GiB", title=f"{consortium['images']:,} images")
    for x, v in enumerate(values):
        right.text(x, v, f"{v:,.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


# -- indexing throughput ---------------------------------------------------------------------

_TENANT, _COLLECTION, _VERSION = "bench", "scaling", "v0001"


def _prepare_store(root: Path, n_images: int, fit_images: int, n_components: int) -> list[str]:
    """A filesystem store holding a fitted model (current version) and `n_images` uploads,
    written the way the gateway and the training task write them. Beyond the dataset's slices
    (10⁴ for a re-index extrapolation), its protected slices are stored again under new ids."""
    import io

    import httpx

    from pecbir_contracts.layout import CollectionLayout, new_image_id
    from pecbir_contracts.png import encode_png
    from pecbir_contracts.records import write_current_version
    from pecbir_encryptor.core import Encryptor
    from pecbir_platform.store import FilesystemStore
    from pecore.datasets import load_figshare
    from pecore.keys import MasterKey
    from pecore.pipeline import CBIRPipeline

    data = load_figshare()
    store = FilesystemStore(root)
    layout = CollectionLayout(_TENANT, _COLLECTION)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.images))
    fit, rest = order[:fit_images], order[fit_images:]
    upload = rest[np.arange(n_images) % len(rest)]
    encryptor = Encryptor(MasterKey.from_seed(4), httpx.Client(base_url="http://unused"))
    protected = {
        int(i): encryptor.protect(
            np.asarray(data.images[i]), data.masks[i], opaque_id=f"bench-{i:08d}", label=1
        )
        for i in np.unique(np.concatenate([fit, upload]))
    }
    # The model is fitted on cipher images, as the training task does.
    pipeline = CBIRPipeline(n_components=n_components, n_train_patches=40_000, n_jobs=1)
    pipeline.fit(
        [protected[int(i)].cipher for i in fit],
        [protected[int(i)].mask for i in fit],
        np.asarray(data.labels)[fit],
    )
    buffer = io.BytesIO()
    pipeline.save(buffer)
    store.put(layout.model(_VERSION), buffer.getvalue())
    write_current_version(store, layout, _VERSION)
    image_ids = []
    for i in upload:
        image_id = new_image_id()
        item = protected[int(i)]
        store.put(layout.cipher(image_id), encode_png(item.cipher))
        store.put(layout.mask(image_id), encode_png(item.mask))
        store.put(layout.meta(image_id), item.metadata.model_dump_json().encode())
        image_ids.append(image_id)
    return image_ids


def _runtime(root: Path):
    from pecbir_indexer.runtime import configure_runtime
    from pecbir_indexer.settings import IndexerSettings
    from pecbir_platform.bus import InMemoryBus
    from pecbir_platform.store import FilesystemStore

    settings = IndexerSettings(store_url=f"file://{root}", encode_threads=1)
    return configure_runtime(FilesystemStore(root), InMemoryBus(), settings)


def _index_share(root: str, image_ids: list[str]) -> tuple[float, int]:
    """One worker process: load the model (not timed), then index its share of the images."""
    import threadpoolctl

    from pecbir_contracts.layout import CollectionLayout
    from pecbir_indexer import work

    threadpoolctl.threadpool_limits(1)
    rt = _runtime(Path(root))
    rt.model(CollectionLayout(_TENANT, _COLLECTION), _VERSION)
    started = time.perf_counter()
    for image_id in image_ids:
        outcome = work.index_image(rt, _TENANT, _COLLECTION, image_id)
        assert outcome.state == "indexed", outcome
    return time.perf_counter() - started, len(image_ids)


def _cost_split(root: Path, image_ids: list[str]) -> dict[str, float]:
    """Mean ms per image of each step `work.index_image` takes, timed one by one."""
    import threadpoolctl

    from pecbir_contracts.events import VectorEvent
    from pecbir_contracts.layout import CollectionLayout
    from pecbir_contracts.records import FeatureRecord
    from pecbir_indexer import work
    from pecore.features import roi_patches
    from pecore.fisher import moments
    from pecore.roi import dilate_mask

    threadpoolctl.threadpool_limits(1)
    rt = _runtime(root)
    layout = CollectionLayout(_TENANT, _COLLECTION)
    pipeline = rt.model(layout, _VERSION)
    totals = {"decode": 0.0, "patches": 0.0, "fisher_vector": 0.0, "store": 0.0}
    for image_id in image_ids:
        t0 = time.perf_counter()
        meta, cipher, mask = work.load_image(rt, layout, image_id)
        t1 = time.perf_counter()
        roi = dilate_mask(mask, pipeline.radius)
        patches = roi_patches(
            cipher, roi, pipeline.patch_size, pipeline.radius, pipeline.encoder_.n_regions, roi=roi
        )
        y = pipeline.pca_.transform(patches.patches)
        t2 = time.perf_counter()
        fisher = pipeline.encoder_.encode(y, patches.bounds, moments(y))[None, :]
        vector = pipeline.project(fisher)[0]
        t3 = time.perf_counter()
        record = FeatureRecord(_VERSION, vector, meta.label)
        rt.store.put(layout.features("v9999", image_id), record.to_bytes())
        rt.bus.publish(
            VectorEvent(
                tenant=_TENANT,
                collection=_COLLECTION,
                version=_VERSION,
                image_id=image_id,
                label=meta.label,
                vector=[float(v) for v in vector],
            )
        )
        t4 = time.perf_counter()
        for name, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            totals[name] += seconds
    return {name: 1000 * seconds / len(image_ids) for name, seconds in totals.items()}


def run_indexing(args: argparse.Namespace) -> int:
    import multiprocessing
    import shutil
    import tempfile

    from pecbir_contracts.layout import CollectionLayout

    processes = [int(p) for p in args.processes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="pecbir-bench-index-"))
    try:
        print(f"preparing a store with a D={args.n_components} model and {args.images} uploads")
        image_ids = _prepare_store(root, args.images, args.fit_images, args.n_components)
        layout = CollectionLayout(_TENANT, _COLLECTION)
        split = _cost_split(root, image_ids)
        runs = []
        context = multiprocessing.get_context("spawn")
        for count in processes:
            for key in list(_list_features(root, layout)):
                (root / key).unlink()
            shares = [image_ids[i::count] for i in range(count)]
            with context.Pool(count) as pool:
                results = pool.starmap(_index_share, [(str(root), share) for share in shares])
            wall = max(seconds for seconds, _n in results)
            runs.append(
                {
                    "processes": count,
                    "images": len(image_ids),
                    "seconds": wall,
                    "images_per_s": len(image_ids) / wall,
                    "images_per_s_per_process": len(image_ids) / wall / count,
                }
            )
            print(f"{count} process(es): {len(image_ids) / wall:.1f} images/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    target = 10.0
    result = {
        "benchmark": "indexer throughput (work.index_image: store → features → store + event)",
        "n_components": args.n_components,
        "images": args.images,
        "store": "filesystem (local disk); MinIO adds a network round trip per object",
        "cost_split_ms_per_image": split,
        "runs": runs,
        "target_images_per_s_per_core": target,
        "meets_target": all(r["images_per_s_per_process"] >= target for r in runs),
        "machine": _machine(),
    }
    _write(args.out, result)
    total = sum(split.values())
    for name, ms in split.items():
        print(f"{name:<14} {ms:7.1f} ms per image ({100 * ms / total:4.1f} %)")
    _plot_indexing(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _list_features(root: Path, layout) -> list[str]:
    from pecbir_platform.store import FilesystemStore

    return FilesystemStore(root).list(layout.root + "features/")


def _plot_indexing(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = result["cost_split_ms_per_image"]
    runs = result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(list(split), list(split.values()), color=["C0", "C1", "C2", "C3"])
    left.set(ylabel="ms per image", title=f"per-image cost, D={result['n_components']}")
    positions = list(range(len(runs)))
    right.bar(positions, [r["images_per_s"] for r in runs], color="C0")
    right.set_xticks(positions, [str(r["processes"]) for r in runs])
    right.axhline(
        result["target_images_per_s_per_core"], color="red", lw=1, label="target per core"
    )
    right.set(xlabel="worker processes", ylabel="images / s", title="indexing throughput")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
