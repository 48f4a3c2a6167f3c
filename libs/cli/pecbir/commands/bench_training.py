"""`pecbir bench-training`: peak memory and time of CFML training, in memory vs streamed.

Synthetic float32 Fisher vectors of F features (three classes; F = 81 920 is D = 64, d = 80,
R = 8, the cipher-image size of issue 17) are written once as `.npy` chunks. Each (N, mode)
runs in a fresh process under an address-space limit (`--limit-gib`, a stand-in for a machine's
memory) and reports its peak RSS:

- `memory`: today's path, all N vectors loaded into one array, `CFML.fit` (one centred copy);
- `streamed`: `CFML.fit_chunks` over the memory-mapped chunks (two chunks + the N×N Gram);
- `capped`: the same with `max_rank` (the randomised k-dimensional subspace);
- `primal`: `CFML(solver="primal").fit_chunks`, the exact solve from streamed F×F statistics.

`--dtype float64` reads the chunks as float64: on a torch device the primal statistics and
LOBPCG then run in float64 (2·F² doubles: 100 GiB at F = 81 920, an H200's memory). With
float32 chunks below F + classes templates, CFML keeps the statistics in float32 and runs
LOBPCG in float64 over them (2·F² floats and a block of widened rows).

A run that does not fit under the limit is recorded as such. The table also gives each mode's
memory model (bytes, fitted to nothing: the arrays each path allocates) at larger N, labelled
as a model, not a measurement. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

GIB = 1024**3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-training", help="peak memory/time of CFML training: in memory vs streamed"
    )
    parser.add_argument("--sizes", default="2000,4000,8000", help="template counts N")
    parser.add_argument("--features", type=int, default=81_920, help="Fisher-vector length F")
    parser.add_argument("--chunk", type=int, default=500, help="templates per chunk")
    parser.add_argument(
        "--limit-gib",
        type=float,
        default=5.0,
        help="address-space limit (0: none; CUDA needs none)",
    )
    parser.add_argument(
        "--modes", default="memory,streamed", help="memory, streamed, capped, primal"
    )
    parser.add_argument("--max-rank", type=int, default=4096, help="k of the capped mode")
    parser.add_argument("--device", default=None, help="torch device for the block products")
    parser.add_argument("--max-iter", type=int, default=1000, help="LOBPCG cap (primal, torch)")
    parser.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help="chunks read as"
    )
    parser.add_argument("--model-sizes", default="10000,50000,100000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--child-timeout", type=float, default=0, help="seconds per measurement (0: none)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/gpu/training_memory.json"))
    parser.set_defaults(func=run)


def _labels(n: int) -> np.ndarray:
    return np.arange(n) % 3


def _write_chunk(
    path: str, index: int, n: int, features: int, start: int, rows: int, seed: int
) -> str:
    """Chunk `index` (templates start … start + rows) of the synthetic set, drawn from its own
    seed, so that chunks can be written in any order by any process."""
    centres = np.random.default_rng(seed).standard_normal((3, features)).astype(np.float32)
    rng = np.random.default_rng([seed, index])
    block = rng.standard_normal((rows, features), dtype=np.float32)
    block += 0.3 * centres[_labels(n)[start : start + rows]]
    np.save(path, block)
    return path


def _write_chunks(folder: Path, n: int, features: int, chunk: int, seed: int) -> list[str]:
    """The chunks, written by several processes (one chunk of 5 000 × 81 920 takes ~9 s to
    draw: 10⁵ templates in one process would take longer than the fits they feed)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    starts = range(0, n, chunk)
    jobs = [
        (str(folder / f"{index:06d}.npy"), index, n, features, start, min(chunk, n - start), seed)
        for index, start in enumerate(starts)
    ]
    workers = max(1, min(len(jobs), (os.cpu_count() or 1) // 2))
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_write_chunk, *job) for job in jobs]
        return [f.result() for f in tqdm(futures, desc="writing chunks", unit="chunk")]


class _Reads(Sequence[np.ndarray]):
    def __init__(self, paths: list[str], dtype: str = "float32") -> None:
        self.paths, self.dtype = paths, np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        return np.load(self.paths[i]).astype(self.dtype, copy=False)


def child(
    mode: str,
    paths: list[str],
    n: int,
    limit_bytes: int,
    device: str,
    max_rank: int,
    max_iter: int = 1000,
    dtype: str = "float32",
) -> None:
    """One measurement, in its own process (peak RSS is per process)."""
    import logging
    import resource

    from sklearn.exceptions import ConvergenceWarning

    from pecore.metric import CFML

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # solver progress

    if limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    labels = _labels(n)
    device = device or None
    started = time.perf_counter()
    reason = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if mode == "memory":
                X = np.concatenate([np.load(p) for p in paths])
                metric = CFML(n_components=10).fit(X, labels)
            else:
                # read on access, as from a store (a memory map would count every chunk's
                # pages in RSS and in the address space)
                rank = max_rank if mode == "capped" else None
                solver = "primal" if mode == "primal" else "dual"
                metric = CFML(n_components=10, max_rank=rank, solver=solver, max_iter=max_iter)
                metric.fit_chunks(_Reads(paths, dtype), labels, device=device)
        outcome = "fitted"
        unconverged = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
        if unconverged:  # the capped LOBPCG returned its best pairs, not eigenpairs
            outcome, reason = "unconverged", str(unconverged[0].message)
    except MemoryError:
        outcome = "MemoryError"
    except ValueError as exc:  # a solve CFML refuses
        outcome, reason = "refused", str(exc)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"outcome": outcome, "seconds": seconds, "peak_rss_bytes": peak}
    if reason:
        result["reason"] = reason
    fitted = outcome in ("fitted", "unconverged")
    if fitted:
        result["eigenvalues"] = [float(g) for g in metric.eigenvalues_]
    residuals = getattr(metric, "eigen_residuals_", None) if fitted else None
    if residuals is not None:  # how far the capped LOBPCG got
        result["eigen_residuals"] = [float(r) for r in residuals]
    if device is not None and device.startswith("cuda"):
        import torch

        result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    print(json.dumps(result))


def _measure(
    mode: str, paths: list[str], n: int, limit_bytes: int, args: argparse.Namespace
) -> dict[str, object]:
    code = (
        "import json, sys; from pecbir.commands.bench_training import child; "
        "child(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), "
        "sys.argv[5], int(sys.argv[6]), int(sys.argv[7]), sys.argv[8])"
    )
    argv = [
        mode,
        json.dumps(paths),
        str(n),
        str(limit_bytes),
        args.device or "",
        str(args.max_rank),
        str(args.max_iter),
        args.dtype,
    ]
    timeout = args.child_timeout or None
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        print(stderr, file=sys.stderr, flush=True)
        return {"outcome": f"timed out after {timeout:.0f} s", "stderr": stderr[-600:]}
    print(done.stderr, file=sys.stderr, flush=True)  # the solver's progress
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        # an allocation refused outside numpy's MemoryError path (BLAS, LAPACK work space)
        return {"outcome": f"failed (exit {done.returncode})", "stderr": done.stderr[-400:]}
    return json.loads(lines[-1])


def memory_model(
    mode: str,
    n: int,
    features: int,
    chunk: int,
    rank: int = 4096,
    *,
    device: bool = False,
    itemsize: int = 4,
) -> int:
    """Bytes of the big arrays each path allocates (not a measurement); `device`: of the
    primal path on a torch device, the device's bytes (the host holds one chunk at a time),
    in the chunks' precision (`itemsize`)."""
    if mode == "primal":
        if device:  # the two F×F statistics and a chunk, on the device
            statistics = (2 * features * features + chunk * features) * itemsize
            if itemsize == 4 and n - 3 < features:  # LOBPCG's float64 products: widened rows
                from pecore.metric import FLOAT64_ROWS

                statistics += FLOAT64_ROWS * features * 8
            return statistics
        # the two float32 F×F statistics, LAPACK's float64 copies of M_D and M_S + λI and its
        # work space, chunks
        return 2 * features * features * 4 + 3 * features * features * 8 + 3 * chunk * features * 4
    if mode == "capped":
        width = min(rank + 64, features)
        # the range finder's float32 n×width and F×width, B and V (float64 F×width), the
        # float64 coordinates Z (n×k), the k×k scatters and eigh work space, two chunks
        return (
            (n + features) * width * 4
            + 2 * features * width * 8
            + n * rank * 8
            + 5 * rank * rank * 8
            + 3 * chunk * features * 4
        )
    # both, at the dual solve's peak (r ≈ n): the Gram's eigenvectors V, the coordinates
    # Z = V·s, pair_scatter's two sums and one class's ZcᵀZc (n×n float64 each), and that
    # class's rows of Z (a third of n×n: three classes)
    solve = (5 * n * n + n * n // 3) * 8
    if mode == "memory":
        # the loaded float32 vectors, their centred copy, the float32 Gram product
        return 2 * n * features * 4 + n * n * 4 + solve
    # two float32 chunks and one centred copy
    return 3 * chunk * features * 4 + solve


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    limit = int(args.limit_gib * GIB)
    itemsize = np.dtype(args.dtype).itemsize

    def model_bytes(mode: str, n: int) -> int:
        return memory_model(
            mode,
            n,
            args.features,
            args.chunk,
            args.max_rank,
            device=bool(args.device),
            itemsize=itemsize,
        )

    rows = []
    with tempfile.TemporaryDirectory(prefix="fisher-bench-") as folder:
        paths = _write_chunks(Path(folder), max(sizes), args.features, args.chunk, args.seed)
        for n in sizes:
            used = paths[: -(-n // args.chunk)]
            for mode in args.modes.split(","):
                print(f"N={n} {mode} …", flush=True)
                result = _measure(mode, used, n, limit, args)
                rows.append(
                    {"n_templates": n, "mode": mode, **result, "model_bytes": model_bytes(mode, n)}
                )
                print(json.dumps(rows[-1]), flush=True)
    model = {
        str(n): {mode: model_bytes(mode, n) for mode in ("memory", "streamed", "capped", "primal")}
        for n in (int(s) for s in args.model_sizes.split(","))
    }
    report = {
        "benchmark": "training_memory",
        "features": args.features,
        "chunk": args.chunk,
        "address_space_limit_gib": args.limit_gib,
        "device": args.device or "numpy (CPU)",
        "max_rank": args.max_rank,
        "max_iter": args.max_iter,
        "dtype": args.dtype,
        "seed": args.seed,
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()),
        },
        "rows": rows,
        "memory_model_bytes_not_measured": model,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"F = {args.features}, chunk = {args.chunk}, limit {args.limit_gib} GiB")
    print(
        f"{'N':>7} {'mode':>9} {'outcome':>14} {'peak RSS GiB':>12} {'GPU GiB':>8} "
        f"{'model GiB':>9} {'s':>7}"
    )
    for r in rows:
        peak, gpu = r.get("peak_rss_bytes"), r.get("peak_gpu_bytes")
        print(
            f"{r['n_templates']:>7} {r['mode']:>9} {r['outcome']:>14} "
            f"{(peak / GIB if peak else float('nan')):>12.2f} "
            f"{(gpu / GIB if gpu else float('nan')):>8.2f} {r['model_bytes'] / GIB:>9.2f} "
            f"{r.get('seconds', float('nan')):>7.1f}"
        )
    for n, modes in model.items():
        print(
            f"model N={n}: memory {modes['memory'] / GIB:.1f} GiB, "
            f"streamed {modes['streamed'] / GIB:.1f} GiB, capped {modes['capped'] / GIB:.1f} GiB, "
            f"primal {modes['primal'] / GIB:.1f} GiB"
        )
    print(f"wrote {args.out}")
    return 0
