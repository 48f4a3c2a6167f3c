"""`pecbir recovery`: seeded fault loops over the real services, for operators (issue 15).

Starts a private Redis (append-only, fsync always), Ceph radosgw, two Celery workers for
uploads and re-index plus one for training (deploy/k8s's pools; `--train-workers 0`: two
workers on every queue) and uvicorn gateway + search on loopback
(`pecbir_harness.procs.Cluster`), then runs `--loops`
loops of `pecbir_harness.recovery.run_loop`, each on a fresh collection: seed and train, then
`--uploads` uploads under `--faults` seeded faults (kill -9 of workers mid-task and
mid-training, Redis, search — also while Redis is down —, gateway mid-request, radosgw).
Prints a table and writes recovery.json under --out: acknowledged, lost, duplicated, debris,
ack→searchable p50/p99/max, worst time from the last fault to all-searchable. Exit code 1 if
a loop lost, duplicated or left anything, or a service was down at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recovery",
        help="seeded fault loops (kill -9 of every process kind) over the real services",
    )
    parser.add_argument("--loops", type=int, default=5)
    parser.add_argument("--uploads", type=int, default=300, help="uploads per loop")
    parser.add_argument("--faults", type=int, default=12, help="faults per loop")
    parser.add_argument(
        "--workers", type=int, default=2, help="Celery workers (solo pool) for uploads and re-index"
    )
    parser.add_argument(
        "--train-workers",
        type=int,
        default=1,
        help="workers of their own for training, as deploy/k8s's indexer-train pool (0: the "
        "--workers train too, on every queue)",
    )
    parser.add_argument(
        "--fault-kinds",
        default="all",
        help="comma-separated kinds of pecbir_harness.recovery.FAULT_KINDS, or 'all'",
    )
    parser.add_argument("--upload-threads", type=int, default=3)
    parser.add_argument("--upload-pace", type=float, default=0.05, help="s between uploads")
    parser.add_argument("--redelivery-bound", type=float, default=30.0, help="seconds")
    parser.add_argument("--reconcile-interval", type=float, default=5.0, help="seconds")
    parser.add_argument("--settle-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds a restarted service may take to answer (search loads every collection)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/recovery"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pecbir_contracts.tasks import QUEUE_TRAIN, WORKER_QUEUES
    from pecbir_harness.procs import Cluster
    from pecbir_harness.recovery import (
        FAULT_KINDS,
        RecoveryConfig,
        as_dict,
        checks,
        recovery_env,
        run_loop,
        summary,
    )

    logging.getLogger("httpx").setLevel(logging.WARNING)
    kinds = FAULT_KINDS if args.fault_kinds == "all" else tuple(args.fault_kinds.split(","))
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise SystemExit(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    base = RecoveryConfig(
        fault_kinds=kinds,
        uploads=args.uploads,
        faults=args.faults,
        seed=args.seed,
        upload_threads=args.upload_threads,
        upload_pace_s=args.upload_pace,
        redelivery_bound_s=args.redelivery_bound,
        reconcile_interval_s=args.reconcile_interval,
        settle_timeout_s=args.settle_timeout,
    )
    # As deploy/k8s: indexer pods on every queue but training, indexer-train pods on training.
    if args.train_workers > 0:
        indexing = tuple(q for q in WORKER_QUEUES if q != QUEUE_TRAIN)
        worker_queues = [indexing] * args.workers + [(QUEUE_TRAIN,)] * args.train_workers
    else:
        worker_queues = []
    load_before = os.getloadavg()
    started = time.time()
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        delay, train_delay = Path(tmp) / "index-delay", Path(tmp) / "train-delay"
        with Cluster(
            Path(tmp),
            encryptor=False,
            own_redis=True,
            workers=args.workers + args.train_workers,
            worker_queues=worker_queues,
            start_timeout_s=args.start_timeout,
            extra_env=recovery_env(base, delay, train_delay),
        ) as cluster:
            cluster.delay_file, cluster.train_delay_file = delay, train_delay
            for loop in range(args.loops):
                cfg = RecoveryConfig(**{**as_dict(base), "seed": args.seed + loop})
                report = run_loop(cluster, cfg, f"recovery-{loop}")
                report["checks"] = checks(report)
                reports.append(report)
                print(_row(loop, report), flush=True)
    results = {
        "config": as_dict(base)
        | {
            "loops": args.loops,
            "workers": args.workers,
            "train_workers": args.train_workers,
            "start_timeout_s": args.start_timeout,
        },
        "summary": summary(reports),
        "loops": reports,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": time.time() - started,
        },
        "store": "Ceph radosgw S3 over HTTP (memstore OSD)",
        "redis": "private, append-only, fsync always",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "recovery.json"
    path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(_table(results))
    print(f"wrote {path}")
    ok = all(check["ok"] for report in reports for check in report["checks"].values())
    return 0 if ok else 1


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _row(loop: int, r: dict) -> str:
    lat = r["ack_to_searchable_s"]
    return (
        f"| {loop} | {r['acknowledged']} | {r['lost']} | {r['duplicated']} | {r['debris']} "
        f"| {r['n_faults']} | {_fmt(lat['p50'])} | {_fmt(lat['p99'])} | {_fmt(lat['max'])} "
        f"| {_fmt(r['last_fault_to_all_searchable_s'])} "
        f"| {_fmt(r['breakdown_s']['ack_to_first_record']['max'])} "
        f"| {_fmt(r['breakdown_s']['first_record_to_searchable']['max'])} "
        f"| {_fmt(r['load_1m']['mean'])} / {_fmt(r['load_1m']['max'])} "
        f"| {'pass' if all(c['ok'] for c in r['checks'].values()) else 'FAIL'} |"
    )


def _table(results: dict) -> str:
    s = results["summary"]
    lines = [
        f"# Recovery loops ({s['loops']} loops, {results['config']['uploads']} uploads and "
        f"{results['config']['faults']} faults each, {results['config']['workers']} workers + "
        f"{results['config'].get('train_workers', 0)} for training; "
        f"redelivery bound {results['config']['redelivery_bound_s']:.0f} s)",
        "",
        "| loop | acknowledged | lost | duplicated | debris | faults | p50 s | p99 s | max s "
        "| last fault → all searchable s | max ack → first record s "
        "| max first record → searchable s | load 1 min mean / max | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(i, r) for i, r in enumerate(results["loops"])),
        "",
        f"Total: {s['acknowledged']} acknowledged, {s['lost']} lost, {s['duplicated']} "
        f"duplicated, {s['debris']} debris after {s['faults']} faults; max ack→searchable "
        f"{_fmt(s['max_ack_to_searchable_s'])} s, worst last fault → all searchable "
        f"{_fmt(s['worst_last_fault_to_all_searchable_s'])} s.",
    ]
    return "\n".join(lines) + "\n"
