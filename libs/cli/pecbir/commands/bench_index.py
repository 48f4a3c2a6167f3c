"""`pecbir bench-index`: the indexer's whole task, one CPU process vs the torch device (issue 17).

What a re-index costs per image, measured on the indexer's own code over a filesystem store:

- **feature step**: `CBIRPipeline.transform` (Fisher vectors + projection) on decoded images
  already in memory, in batches (the device's share of the work), with `--feature-threads`
  batches in flight in one process, or by `--feature-processes` processes sharing the device;
- **whole task**: `pecbir_indexer.batch.index_batch` (the GPU worker's task without Celery) over
  stored images: read and decode the cipher PNG, mask and metadata, features, write the feature
  record (fsync'd), publish the vector event (an in-process bus: the device machine has no
  Redis); `--concurrency` batches in flight, as a worker with that many threads, in
  `--processes` worker processes; the features' share of the wall time and each image's read
  and decode time on its I/O thread say where the time goes;
- **CPU reference**: `pecbir_indexer.work.index_image` (the CPU worker's task) image by image in
  one process, one encode thread, in the same run.

Stored images are cipher slices rebuilt from `bench-gpu --export-crops --cipher` crops: each
crop (the ROI's bounding box plus the patch margin, encrypted with the paper's cipher under a
per-image key) sits in a 512 × 512 canvas of keyed noise, so that the PNG read and decode cost
that of a full cipher slice. `--distinct` images are written; the other ids are hard links to
them (the dataset stored again under new ids: a 10⁶-image store of distinct 512² cipher PNGs
would not fit the lent machine's disk). With `--discard-features` the feature records are
counted but not written: the run without it gives the cost of the writes. The model (PCA +
GMM fitted by the reference code on the crops, CFML on their Fisher vectors) is cached at
`--model-cache`, so the device does not spend its minutes fitting.

Prints a table and writes JSON, with where the whole task's time goes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

TENANT, COLLECTION = "bench", "reindex"
CANVAS = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-index", help="indexing images/s: whole task and feature step, CPU vs torch device"
    )
    parser.add_argument("--crops", type=Path, required=True, help="bench-gpu --export-crops file")
    parser.add_argument("--size", type=int, default=64, help="dictionary size D")
    parser.add_argument("--model-cache", type=Path, default=None, help="fitted model (pickle)")
    parser.add_argument("--train-images", type=int, default=600, help="crops the model is fit on")
    parser.add_argument("--n-train-patches", type=int, default=100_000)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per index batch")
    parser.add_argument("--concurrency", type=int, default=2, help="batches in flight")
    parser.add_argument(
        "--processes",
        default="1",
        help="comma-separated worker-process counts sharing the device (whole task per count)",
    )
    parser.add_argument(
        "--stages", action="store_true", help="profile the device's stages (torch.profiler)"
    )
    parser.add_argument("--io-threads", type=int, default=8, help="store threads per batch")
    parser.add_argument("--feature-images", type=int, default=4096, help="feature-step images")
    parser.add_argument(
        "--feature-threads",
        default="1",
        help="comma-separated counts of feature-step batches in flight (threads, own streams)",
    )
    parser.add_argument(
        "--feature-processes",
        default="",
        help="comma-separated counts of processes sharing the device in the feature step "
        "(each with two batches in flight, as a GPU worker's prefork pool)",
    )
    parser.add_argument("--images", default="4096", help="comma-separated whole-task runs (ids)")
    parser.add_argument("--distinct", type=int, default=2000, help="distinct stored images")
    parser.add_argument("--cpu-images", type=int, default=100, help="images the CPU task indexes")
    parser.add_argument("--discard-features", action="store_true", help="count, do not write")
    parser.add_argument("--store", type=Path, default=None, help="store root (default: a tmp dir)")
    parser.add_argument("--out", type=Path, default=Path("results/gpu/index.json"))
    parser.set_defaults(func=run)


def _model(args: argparse.Namespace, data) -> object:
    """The pipeline (numpy back end), fitted on the first `--train-images` crops or loaded."""
    from pecore.pipeline import CBIRPipeline

    if args.model_cache is not None and args.model_cache.exists():
        return CBIRPipeline.load(args.model_cache)
    n = min(args.train_images, len(data.labels))
    pipeline = CBIRPipeline(n_components=args.size, n_train_patches=args.n_train_patches)
    pipeline.set_params(n_jobs=os.cpu_count())
    pipeline.fit(list(data.images[:n]), list(data.masks[:n]), data.labels[:n])
    if args.model_cache is not None:
        args.model_cache.parent.mkdir(parents=True, exist_ok=True)
        pipeline.save(args.model_cache)
    return pipeline


def _canvases(data, n: int, start: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Full-size cipher slices `start` ≤ i < `start` + `n`: crop i at a seeded place in 512²
    keyed noise, its mask likewise (tumours lie anywhere in a slice: a batch's masks do not
    share one corner)."""
    images, masks = [], []
    for i in range(start, start + n):
        crop, mask = data.images[i % len(data.labels)], data.masks[i % len(data.labels)]
        rng = np.random.default_rng(i)
        canvas = rng.integers(0, 256, (CANVAS, CANVAS), dtype=np.uint8)
        full = np.zeros((CANVAS, CANVAS), dtype=bool)
        h, w = min(crop.shape[0], CANVAS), min(crop.shape[1], CANVAS)
        top, left = rng.integers(0, CANVAS - h + 1), rng.integers(0, CANVAS - w + 1)
        canvas[top : top + h, left : left + w] = crop[:h, :w]
        full[top : top + h, left : left + w] = mask[:h, :w]
        images.append(canvas)
        masks.append(full)
    return images, masks


def _fill_store(store, layout, images, masks, labels, n_ids: int, bar_desc: str) -> list[str]:
    """Write the distinct images, then hard-link them under new ids up to `n_ids`."""
    from tqdm import tqdm

    from pecbir_contracts.layout import new_image_id
    from pecbir_contracts.png import encode_png
    from pecbir_contracts.schemas import ImageMetadata

    ids: list[str] = []
    for image, mask, label in zip(images, masks, labels, strict=True):
        image_id = new_image_id()
        meta = ImageMetadata(
            opaque_id=f"opaque-{image_id[:12]}",
            label=int(label),
            height=CANVAS,
            width=CANVAS,
            key={"counter": 0, "check": "sha256:0123456789abcdef"},
        )
        store.put(layout.cipher(image_id), encode_png(image))
        store.put(layout.mask(image_id), encode_png(mask))
        store.put(layout.meta(image_id), meta.model_dump_json().encode())
        ids.append(image_id)
    chunks = [(start, min(start + 10_000, n_ids)) for start in range(len(ids), n_ids, 10_000)]
    # processes, not threads: 16 threads linked only 2 600 ids/s, held by the GIL between the
    # system calls (10⁶ ids took 6.4 minutes of a 10-minute device command)
    with (
        ProcessPoolExecutor(os.cpu_count() or 1) as pool,
        tqdm(total=n_ids - len(ids), desc=bar_desc, unit="id", mininterval=2) as bar,
    ):
        link = partial(_link_ids, str(store.root), layout, list(ids))
        for linked in pool.map(link, chunks):
            ids.extend(linked)
            bar.update(len(linked))
    return ids


def _link_ids(root: str, layout, distinct: list[str], span: tuple[int, int]) -> list[str]:
    """Hard-link the distinct images under a fresh id each, for ids span[0] ≤ k < span[1]."""
    from pecbir_contracts.layout import new_image_id

    made = []
    for k in range(*span):
        source, image_id = distinct[k % len(distinct)], new_image_id()
        os.makedirs(os.path.join(root, layout.image_prefix(image_id)))
        for key_of in (layout.cipher, layout.mask, layout.meta):
            os.link(os.path.join(root, key_of(source)), os.path.join(root, key_of(image_id)))
        made.append(image_id)
    return made


class _Timed:
    """Wall seconds spent inside a callable (summed over calls; concurrent calls overlap)."""

    def __init__(self, func) -> None:
        self.func, self.seconds, self.calls = func, 0.0, 0
        self._lock = threading.Lock()

    def __call__(self, *a, **kw):
        started = time.perf_counter()
        try:
            return self.func(*a, **kw)
        finally:
            with self._lock:  # called from the I/O threads at once
                self.seconds += time.perf_counter() - started
                self.calls += 1


class _DiscardFeatures:
    """A store wrapper that counts feature-record writes instead of making them."""

    def __init__(self, store, prefix: str) -> None:
        self._store, self._prefix = store, prefix
        self.discarded_bytes = 0
        self.root = store.root

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream"):
        if key.startswith(self._prefix):
            self.discarded_bytes += len(data)
            return None
        return self._store.put(key, data, content_type)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class _SerialisingBus:
    """The vector stream without Redis (the device machine has none): each event is serialised
    as the Redis bus would, and counted."""

    def __init__(self) -> None:
        self.events, self.bytes = 0, 0
        self._lock = threading.Lock()

    def publish(self, event) -> str:
        data = event.model_dump_json()
        with self._lock:
            self.events += 1
            self.bytes += len(data)
            return f"{self.events}-0"


def _runtime(root: Path, discard: bool, device: str, io_threads: int):
    """The GPU worker's runtime over the filesystem store at `root`."""
    from pecbir_contracts.layout import CollectionLayout
    from pecbir_indexer.runtime import Runtime
    from pecbir_indexer.settings import IndexerSettings
    from pecbir_platform.store import FilesystemStore

    base = FilesystemStore(root)
    prefix = f"{CollectionLayout(TENANT, COLLECTION).root}features/"
    store = _DiscardFeatures(base, prefix) if discard else base
    settings = IndexerSettings(
        feature_backend="torch", feature_device=device, batch_io_threads=io_threads
    )
    return Runtime(settings, store, _SerialisingBus())


def _process_worker(
    root: str, discard: bool, device: str, version: str, first: str, args: dict, queues
) -> None:
    """One worker process of `--processes`: warm up, wait for the start, index chunks."""
    from pecbir_contracts.layout import CollectionLayout
    from pecbir_indexer import batch
    from pecbir_indexer.work import load_image

    tasks, out, start = queues
    rt = _runtime(Path(root), discard, device, args["io_threads"])
    layout = CollectionLayout(TENANT, COLLECTION)
    _, cipher, mask = load_image(rt, layout, first)
    rt.model(layout, version).fisher_vectors([cipher], [mask])  # model, kernels, allocator
    compute, load = _Timed(batch._features), _Timed(batch._load)
    batch._features, batch._load = compute, load
    out.put(("ready", 0, {}))
    start.wait()

    def loop() -> None:
        while (chunk := tasks.get()) is not None:
            try:
                outcome = batch.index_batch(rt, TENANT, COLLECTION, version, chunk)
            except Exception as exc:  # a Celery worker would retry it; the bench reports it
                out.put(("failed", len(chunk), f"{type(exc).__name__}: {exc}"[:300]))
                continue
            counts = (len(outcome.indexed), len(outcome.already_indexed))
            out.put(("done", counts, outcome.poison))

    threads = [threading.Thread(target=loop) for _ in range(args["concurrency"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    discarded = getattr(rt.store, "discarded_bytes", 0)  # this process's own count
    out.put(("exit", (compute.seconds, load.seconds, discarded), {}))


def _whole_task_processes(
    root: Path, ids: list[str], version: str, processes: int, device: str, args
) -> dict:
    """`_whole_task` run by `processes` worker processes sharing the device, as a GPU worker
    with `--concurrency processes` (prefork) would; the clock starts once all are warm."""
    import multiprocessing

    from tqdm import tqdm

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    tasks, out, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    for i in range(0, len(ids), args.batch_size):
        tasks.put(ids[i : i + args.batch_size])
    for _ in range(processes * args.concurrency):
        tasks.put(None)
    options = {"io_threads": args.io_threads, "concurrency": args.concurrency}
    workers = [
        ctx.Process(
            target=_process_worker,
            args=(
                str(root),
                args.discard_features,
                device,
                version,
                ids[0],
                options,
                (tasks, out, start),
            ),
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            kind, _, _ = out.get(timeout=900)
            if kind != "ready":
                raise RuntimeError(f"worker process failed to start ({kind})")
        started = time.perf_counter()
        start.set()
        done, indexed, feature_seconds, load_seconds, exited, discarded = 0, 0, 0.0, 0.0, 0, 0
        failed: list[str] = []
        with tqdm(total=len(ids), desc=f"index {version} x{processes}", unit="img") as bar:
            while exited < processes:
                try:
                    kind, value, detail = out.get(timeout=5)  # detail: poison or error
                except queue.Empty:
                    died = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                    if died:
                        raise RuntimeError(f"a worker process died (exit {died[0]})") from None
                    continue
                if kind == "failed":
                    failed.append(detail)
                    continue
                if detail:
                    raise RuntimeError(f"poison in the benchmark: {detail}")
                if kind == "done":
                    indexed += value[0]
                    done += value[0] + value[1]
                    bar.update(value[0] + value[1])
                    if done == len(ids):
                        wall = time.perf_counter() - started
                else:
                    exited += 1
                    feature_seconds += value[0]
                    load_seconds += value[1]
                    discarded += value[2]
        if done != len(ids):
            reasons = f"; {len(failed)} batches failed, first: {failed[0]}" if failed else ""
            raise RuntimeError(f"the workers indexed {done} of {len(ids)} images{reasons}")
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    return {
        "images": len(ids),
        "indexed": indexed,
        "processes": processes,
        "feature_record_bytes_discarded": discarded,
        "wall_seconds": wall,
        "images_per_s": len(ids) / wall,
        "feature_seconds_summed": feature_seconds,
        "feature_share_of_wall": feature_seconds / wall / (args.concurrency * processes),
        # one image's store read + PNG decodes, on an I/O thread (several run at once)
        "load_ms_per_image_per_thread": 1000 * load_seconds / len(ids),
    }


def _feature_step(
    pipeline, images, masks, batch: int, threads: int = 1, *, warm: bool = True
) -> float:
    """Images/s of `transform` (Fisher vectors + projection, as the indexer) on decoded images
    (one warm-up batch first), with `threads` batches in flight, each thread on its own CUDA
    stream: one batch's host work (boxes, crops, page-locked copies) then overlaps another's
    device work, as in a GPU worker running several batches at once."""
    import contextlib

    if warm:
        pipeline.transform(images[:batch], masks[:batch])  # kernels, the model's tensors, W
        _sync(pipeline)
    on_cuda = pipeline.backend == "torch" and str(pipeline.device or "").startswith("cuda")

    def one(start: int) -> None:
        if on_cuda:
            import torch

            scope = torch.cuda.stream(torch.cuda.Stream(device=pipeline.device))
        else:
            scope = contextlib.nullcontext()
        with scope:
            pipeline.transform(images[start : start + batch], masks[start : start + batch])

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(0, len(images), batch)))
    _sync(pipeline)
    return len(images) / (time.perf_counter() - started)


def _feature_step_processes(args, blob: bytes, device: str, processes: int) -> float:
    """Images/s of the feature step run by `processes` processes sharing the device, each on
    its own share of `--feature-images` slices with two batches in flight: a GPU worker's
    prefork pool, where one process's host work (under its own GIL) overlaps the others'.
    The clock starts once every process has built its slices and run a warm-up batch."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    out, start = ctx.Queue(), ctx.Event()
    share = args.feature_images // processes
    workers = [
        ctx.Process(
            target=_feature_worker,
            args=(str(args.crops), blob, device, p * share, share, args.batch_size, (out, start)),
        )
        for p in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            kind, detail = out.get(timeout=600)
            if kind != "ready":
                raise RuntimeError(f"a feature-step process failed: {detail}")
        started = time.perf_counter()
        start.set()
        for _ in workers:
            kind, detail = out.get(timeout=600)
            if kind != "done":
                raise RuntimeError(f"a feature-step process failed: {detail}")
        return share * processes / (time.perf_counter() - started)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()


def _feature_worker(
    crops: str, blob: bytes, device: str, first: int, n: int, batch: int, queues
) -> None:
    """One process of `_feature_step_processes`."""
    from pecbir.commands.bench_gpu import _load_crops
    from pecore.pipeline import CBIRPipeline

    out, start = queues
    try:
        images, masks = _canvases(_load_crops(Path(crops)), n, start=first)
        pipeline = CBIRPipeline.load(io.BytesIO(blob))
        pipeline.set_params(backend="torch", device=device)
        pipeline.transform(images[:batch], masks[:batch])  # kernels, the model's tensors, W
        _sync(pipeline)
    except Exception as exc:
        out.put(("failed", f"{type(exc).__name__}: {exc}"[:300]))
        return
    out.put(("ready", ""))
    start.wait()
    try:
        _feature_step(pipeline, images, masks, batch, threads=2, warm=False)
    except Exception as exc:
        out.put(("failed", f"{type(exc).__name__}: {exc}"[:300]))
        return
    out.put(("done", ""))


def _stage_profile(pipeline, images, masks, batch: int) -> dict[str, dict[str, float]]:
    """Device (else CPU) milliseconds per image of each named stage of the torch back end
    (`TorchFeatures._batch`'s record_function names), over at most four batches; on CUDA also
    the twelve device operations (kernels, copies) that took the most."""
    import torch

    n = min(len(images), 4 * batch)
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_cuda = str(pipeline.device or "").startswith("cuda")
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for start in range(0, n, batch):
            pipeline.transform(images[start : start + batch], masks[start : start + batch])
        _sync(pipeline)
    out, ops = {}, {}
    for event in profile.key_averages():
        micros = event.device_time_total if on_cuda else event.cpu_time_total
        if event.key.startswith("pecbir."):
            out[event.key.removeprefix("pecbir.")] = micros / 1000 / n
        elif on_cuda and micros > 0:  # kernels and copies: what a stage's time is made of
            ops[event.key[:80]] = micros / 1000 / n
    slowest = sorted(ops.items(), key=lambda item: -item[1])[:12]
    return {"stages": out, "device_ops": dict(slowest)}


def _sync(pipeline) -> None:
    if pipeline.backend == "torch" and str(pipeline.device or "").startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _whole_task(rt, ids: list[str], version: str, args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from pecbir_indexer import batch

    compute, load = _Timed(batch._features), _Timed(batch._load)
    publish = _Timed(rt.bus.publish)
    batch._features, batch._load, rt.bus.publish = compute, load, publish
    chunks = [ids[i : i + args.batch_size] for i in range(0, len(ids), args.batch_size)]
    indexed = 0
    try:
        started = time.perf_counter()
        with (
            ThreadPoolExecutor(args.concurrency) as pool,
            tqdm(total=len(ids), desc=f"index {version}", unit="img", mininterval=2) as bar,
        ):
            for outcome in pool.map(
                lambda chunk: batch.index_batch(rt, TENANT, COLLECTION, version, chunk), chunks
            ):
                if outcome.poison:
                    raise RuntimeError(f"poison in the benchmark: {outcome.poison}")
                indexed += len(outcome.indexed)
                bar.update(len(outcome.indexed) + len(outcome.already_indexed))
        wall = time.perf_counter() - started
    finally:
        batch._features, batch._load, rt.bus.publish = compute.func, load.func, publish.func
    return {
        "images": len(ids),
        "indexed": indexed,
        "wall_seconds": wall,
        "images_per_s": len(ids) / wall,
        # summed over the batches in flight: with concurrency > 1 these overlap the reads
        "feature_seconds_summed": compute.seconds,
        "publish_seconds": publish.seconds,
        "feature_share_of_wall": compute.seconds / wall / args.concurrency,
        "load_ms_per_image_per_thread": 1000 * load.seconds / len(ids),
    }


def _cpu_task(store, layout, version: str, ids: list[str]) -> dict:
    from tqdm import tqdm

    from pecbir_indexer import work
    from pecbir_indexer.runtime import Runtime
    from pecbir_indexer.settings import IndexerSettings
    from pecbir_platform.bus import InMemoryBus

    rt = Runtime(IndexerSettings(encode_threads=1), store, InMemoryBus())
    work.index_image(rt, TENANT, COLLECTION, ids[0], version)  # loads the model
    started = time.perf_counter()
    for image_id in tqdm(ids[1:], desc="cpu index_image", unit="img"):
        work.index_image(rt, TENANT, COLLECTION, image_id, version)
    wall = time.perf_counter() - started
    return {"images": len(ids) - 1, "wall_seconds": wall, "images_per_s": (len(ids) - 1) / wall}


def run(args: argparse.Namespace) -> int:
    import torch

    from pecbir.commands.bench_gpu import _load_crops
    from pecbir_contracts.layout import CollectionLayout
    from pecbir_contracts.records import write_current_version
    from pecore.pipeline import CBIRPipeline
    from pecore.torch_features import resolve_device

    device = resolve_device(args.device)
    data = _load_crops(args.crops)
    started = time.perf_counter()
    reference = _model(args, data)
    model_seconds = time.perf_counter() - started
    blob = io.BytesIO()
    reference.save(blob)
    runs = [int(n) for n in args.images.split(",")]
    process_counts = [int(n) for n in args.processes.split(",")]
    distinct = min(args.distinct, max(runs))
    images, masks = _canvases(data, max(distinct, args.feature_images))
    labels = np.resize(data.labels, len(images))

    # the feature step, both back ends on the same decoded slices
    torch_pipe = CBIRPipeline.load(io.BytesIO(blob.getvalue()))
    torch_pipe.set_params(backend="torch", device=device)
    feature_threads = [int(n) for n in args.feature_threads.split(",")]
    feature_torch = {
        threads: _feature_step(
            torch_pipe,
            images[: args.feature_images],
            masks[: args.feature_images],
            args.batch_size,
            threads,
        )
        for threads in feature_threads
    }
    feature_processes = {
        processes: _feature_step_processes(args, blob.getvalue(), device, processes)
        for processes in (int(n) for n in args.feature_processes.split(",") if n)
    }
    stages = (
        _stage_profile(
            torch_pipe, images[: args.feature_images], masks[: args.feature_images], args.batch_size
        )
        if args.stages
        else None
    )
    cpu_pipe = CBIRPipeline.load(io.BytesIO(blob.getvalue()))
    cpu_pipe.set_params(n_jobs=1)
    n_cpu = min(args.cpu_images, len(images))
    feature_cpu = _feature_step(cpu_pipe, images[:n_cpu], masks[:n_cpu], 32)

    root = args.store or Path(tempfile.mkdtemp(prefix="pecbir-bench-index-"))
    layout = CollectionLayout(TENANT, COLLECTION)
    rows = []
    try:
        if device.startswith("cuda"):  # what the feature step's streams cached: the workers'
            torch.cuda.empty_cache()
        rt = _runtime(root, args.discard_features, device, args.io_threads)
        base = rt.store._store if args.discard_features else rt.store
        filled = _fill_store(
            base,
            layout,
            images[:distinct],
            masks[:distinct],
            labels[:distinct],
            max(runs),
            "hard links",
        )
        versions = 0
        for n in runs:
            for processes in process_counts:
                versions += 1
                version = f"v{versions:04d}"
                base.put(layout.model(version), blob.getvalue())
                write_current_version(base, layout, version)
                if processes == 1:
                    row = {**_whole_task(rt, filled[:n], version, args), "processes": 1}
                else:
                    try:
                        row = _whole_task_processes(
                            root, filled[:n], version, processes, device, args
                        )
                    except RuntimeError as exc:  # e.g. more workers than the device's memory
                        row = {"images": n, "processes": processes, "failed": str(exc)}
                        print(f"{processes} processes: {exc}", flush=True)
                rows.append(row)
        cpu_version = f"v{versions + 1:04d}"
        base.put(layout.model(cpu_version), blob.getvalue())
        cpu = _cpu_task(base, layout, cpu_version, filled[: args.cpu_images + 1])
        # this process's discarded records and those of the worker processes
        discarded = getattr(rt.store, "discarded_bytes", 0) + sum(
            row.get("feature_record_bytes_discarded", 0) for row in rows
        )
    finally:
        if args.store is None:
            shutil.rmtree(root, ignore_errors=True)

    fisher_dim = int(2 * args.size * reference.pca_.n_components_ * reference.n_regions)
    report = {
        "benchmark": "index",
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "dictionary_size": args.size,
        "pca_dims": int(reference.pca_.n_components_),
        "fisher_vector_length": fisher_dim,
        "model": {"fit_or_load_seconds": model_seconds, "train_images": args.train_images},
        "images": "cipher crops of the figshare slices in 512x512 keyed noise",
        "distinct_stored_images": distinct,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "io_threads": args.io_threads,
        "feature_records": "discarded (counted)" if args.discard_features else "written, fsync'd",
        "feature_record_bytes_discarded": discarded,
        "bus": "in-process (no Redis on the device machine)",
        "feature_step_images_per_s": {
            "torch_by_batches_in_flight": feature_torch,
            "torch_by_processes_two_batches_each": feature_processes,
            "cpu_one_process": feature_cpu,
        },
        "device_stages_ms_per_image": stages and stages["stages"],
        "device_ops_ms_per_image": stages and stages["device_ops"],
        "whole_task": rows,
        "cpu_whole_task_one_process": cpu,
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "load_average_at_end": list(os.getloadavg()),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"device {device} ({report['device_name']}), D = {args.size}, d = {report['pca_dims']}, "
        f"FV {fisher_dim}"
    )
    in_flight = ", ".join(
        [f"{n} in flight {r:,.0f}" for n, r in feature_torch.items()]
        + [f"{n} processes {r:,.0f}" for n, r in feature_processes.items()]
    )
    print(f"feature step, img/s: torch {in_flight}; one CPU process {feature_cpu:,.1f}")
    if stages:
        for name, times in stages.items():
            print(f"{name}, ms per image: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))
    print(
        f"{'images':>9} {'procs':>5} {'wall s':>8} {'img/s':>9} {'features %':>10} "
        f"{'load ms/img':>11}"
    )
    for r in rows:
        if "failed" in r:
            print(f"{r['images']:>9} {r['processes']:>5} failed: {r['failed']}")
            continue
        print(
            f"{r['images']:>9} {r['processes']:>5} {r['wall_seconds']:>8.1f} "
            f"{r['images_per_s']:>9,.0f} {100 * r['feature_share_of_wall']:>9.0f}% "
            f"{r['load_ms_per_image_per_thread']:>11.2f}"
        )
    print(f"CPU index_image, one process: {cpu['images_per_s']:.1f} img/s")
    print(f"wrote {args.out}")
    return 0
