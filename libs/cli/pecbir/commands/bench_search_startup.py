"""`pecbir bench-search-startup`: how long a search service takes to load a collection (issue 15).

A restarted search service loads the vectors of the version it serves before it answers. It
used to read every feature record with its own GET, one after the other; it now reads the
version's snapshot (one object, written by the indexer's janitor, `records.FeatureSnapshot`)
and then only the records the snapshot lacks, `--read-threads` at a time. For each size N this
writes N feature records of one version (and a trained model) into the store, then times
`SearchEngine.collection` (the service's own catch-up of one collection) in three ways:

- **one GET per record** (`read_threads=1`, no snapshot): what every start did before;
- **parallel GETs** (`--read-threads`, no snapshot): a store without a snapshot yet;
- **snapshot** (`--read-threads`): a snapshot of all but `--uncovered` of the records (what a
  janitor pass leaves: the records written since are read one by one).

The store is Ceph radosgw (S3 over HTTP on loopback, as the services use it) or, with
`--store file`, the filesystem store. Prints a table and writes JSON and the table (.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TENANT = "bench"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-search-startup",
        help="search start-up time for N stored vectors: one GET per record vs snapshot",
    )
    parser.add_argument("--sizes", default="1000,4000,16000", help="comma-separated N")
    parser.add_argument("--store", choices=("radosgw", "file"), default="radosgw")
    parser.add_argument("--read-threads", type=int, default=8)
    parser.add_argument(
        "--uncovered", type=float, default=0.02, help="fraction of records newer than the snapshot"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed loads per way (best kept)")
    parser.add_argument("--out", type=Path, default=Path("results/recovery/startup.json"))
    parser.set_defaults(func=run)


def _pipeline_bytes() -> tuple[bytes, int]:
    """A small trained pipeline (what the store holds as models/<v>/model.npz), its dim."""
    import io

    from pecore.pipeline import CBIRPipeline

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:48, :48]
    images, masks, labels = [], [], []
    for i in range(12):
        label = 1 + i % 3
        mask = (rows - 24) ** 2 + (cols - 24) ** 2 <= 100
        image = rng.normal(60, 10, (48, 48))
        image[mask] = rng.normal(60 + 50 * label, 5, int(mask.sum()))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
        masks.append(mask)
        labels.append(label)
    pipeline = CBIRPipeline(
        n_components=4, n_regions=2, patch_size=5, radius=2, n_train_patches=2000, dim=2
    )
    pipeline.fit(images, masks, np.asarray(labels))
    buffer = io.BytesIO()
    pipeline.save(buffer)
    return buffer.getvalue(), pipeline.projected_dim


def _fill(store, layout, n: int, model: bytes, dim: int, threads: int) -> list[str]:
    from pecbir_contracts.layout import new_image_id
    from pecbir_contracts.records import FeatureRecord, write_current_version

    store.put(layout.model("v0001"), model)
    write_current_version(store, layout, "v0001")
    rng = np.random.default_rng(n)
    ids = [new_image_id() for _ in range(n)]
    vectors = rng.normal(size=(n, dim)).astype(np.float32)

    def put(row: int) -> None:
        record = FeatureRecord("v0001", vectors[row], int(1 + row % 3))
        store.put(layout.features("v0001", ids[row]), record.to_bytes())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(n)))
    return ids


def _time_load(store, layout, read_threads: int, repeats: int) -> tuple[float, int]:
    from pecbir_search.engine import SearchEngine

    best, held = float("inf"), 0
    for _ in range(repeats):
        engine = SearchEngine(store, None, read_threads=read_threads)
        started = time.perf_counter()
        state = engine.collection(layout.tenant, layout.collection)
        best = min(best, time.perf_counter() - started)
        held = len(state.serving.index)
    return best, held


def _time_finding(store, repeats: int) -> dict:
    """Finding the collections with a model (every start): the whole store listed, as before,
    vs one delimited listing per level (`catch_up_all` now)."""
    from pecbir_contracts.layout import TENANTS_PREFIX, CollectionLayout
    from pecbir_contracts.layout import collection_of_current_model_key as of_key
    from pecbir_platform.store import list_children

    def whole_listing() -> int:
        return sum(of_key(key) is not None for key in store.list(TENANTS_PREFIX))

    def by_level() -> int:
        found = 0
        for tenant in list_children(store, TENANTS_PREFIX):
            for collection in list_children(store, f"{TENANTS_PREFIX}{tenant}/collections/"):
                found += store.exists(CollectionLayout(tenant, collection).current_model)
        return found

    timings = {}
    for name, find in (("whole_store_listing", whole_listing), ("by_level", by_level)):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            found = find()
            best = min(best, time.perf_counter() - started)
        timings[f"{name}_s"] = round(best, 3)
        timings["collections"] = found
    timings["objects_in_store"] = len(store.list(TENANTS_PREFIX))
    return timings


def run(args: argparse.Namespace) -> int:
    import contextlib

    from pecbir_contracts.layout import CollectionLayout
    from pecbir_contracts.records import FeatureRecord, FeatureSnapshot

    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    model, dim = _pipeline_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.store == "radosgw":
            from pecbir_harness.procs import S3Bucket
            from pecbir_harness.radosgw import radosgw

            gateway = stack.enter_context(radosgw(Path(tmp) / "radosgw"))
            store = S3Bucket.on(gateway, "startup").open()
        else:
            from pecbir_platform.store import FilesystemStore

            store = FilesystemStore(Path(tmp) / "store")
        for n in sizes:
            layout = CollectionLayout(TENANT, f"startup-{n}")
            started = time.perf_counter()
            ids = _fill(store, layout, n, model, dim, 16)
            fill_s = time.perf_counter() - started
            sequential, held_a = _time_load(store, layout, 1, args.repeats)
            parallel, held_b = _time_load(store, layout, args.read_threads, args.repeats)
            covered = sorted(ids)[: n - round(n * args.uncovered)]
            records = {
                i: FeatureRecord.from_bytes(store.get(layout.features("v0001", i))) for i in covered
            }
            snapshot = FeatureSnapshot.of("v0001", records, dim).to_bytes()
            store.put(layout.features_snapshot("v0001"), snapshot)
            with_snapshot, held_c = _time_load(store, layout, args.read_threads, args.repeats)
            assert held_a == held_b == held_c == n, (held_a, held_b, held_c, n)
            rows.append(
                {
                    "n": n,
                    "fill_s": round(fill_s, 2),
                    "one_get_per_record_s": round(sequential, 3),
                    "parallel_gets_s": round(parallel, 3),
                    "snapshot_s": round(with_snapshot, 3),
                    "snapshot_bytes": len(snapshot),
                    "records_read_one_by_one_with_snapshot": n - len(covered),
                    "speed_up_snapshot_vs_one_get_per_record": round(sequential / with_snapshot, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        finding = _time_finding(store, args.repeats)
        print(json.dumps(finding), flush=True)
    results = {
        "what": "SearchEngine.collection: catch-up of one collection of N vectors (issue 15)",
        "store": "Ceph radosgw S3 over HTTP on loopback (memstore OSD)"
        if args.store == "radosgw"
        else "filesystem store",
        "read_threads": args.read_threads,
        "uncovered_fraction": args.uncovered,
        "repeats_best_of": args.repeats,
        "rows": rows,
        "find_collections": finding,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    table = _table(results)
    args.out.with_suffix(".md").write_text(
        table + f"\n`pecbir bench-search-startup --sizes {args.sizes} --store {args.store}`\n"
    )
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _table(results: dict) -> str:
    lines = [
        f"# Search start-up, one collection ({results['store']}; best of "
        f"{results['repeats_best_of']}; load {results['machine']['loadavg_before'][0]:.1f} → "
        f"{results['machine']['loadavg_after'][0]:.1f})",
        "",
        "| N | one GET per record s | parallel GETs s | snapshot + newer records s "
        "| records read one by one | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['n']} | {row['one_get_per_record_s']:.2f} | {row['parallel_gets_s']:.2f} "
            f"| {row['snapshot_s']:.2f} | {row['records_read_one_by_one_with_snapshot']} "
            f"| {row['speed_up_snapshot_vs_one_get_per_record']}× |"
        )
    find = results["find_collections"]
    lines += [
        "",
        f"Finding the {find['collections']} collections among {find['objects_in_store']} "
        f"objects: whole store listed {find['whole_store_listing_s']:.2f} s, one delimited "
        f"listing per level {find['by_level_s']:.3f} s.",
    ]
    return "\n".join(lines) + "\n"
