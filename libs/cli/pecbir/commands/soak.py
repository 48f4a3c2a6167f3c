"""`pecbir soak`: a bounded soak run of the services as real processes (issue 6).

Starts a private Redis (append-only, fsync always; the machine's Redis if there is no
redis-server binary), Ceph radosgw, one Celery worker and uvicorn gateway + search on loopback
(`pecbir_harness.procs.Cluster`), trains a model on a labelled seed batch, then interleaves uploads
(own idempotency keys, some replayed, some reused with another body) and searches at a client
concurrency that changes every round, sampling the RSS of every service process. Ends with
the checks of `pecbir_harness.soak`: every acknowledged upload searchable, zero 5xx, memory flat.
Prints a table and writes soak.json, soak.md and soak.png under --out; exit code 1 if a check
fails.
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
        "soak", help="soak run of the real services: mixed uploads + searches, memory, 5xx"
    )
    parser.add_argument("--uploads", type=int, default=2000, help="uploads in the mixed phase")
    parser.add_argument("--searches", type=int, default=5000, help="searches in the mixed phase")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="largest client concurrency; rounds cycle through 1, 2, 4, … and this",
    )
    parser.add_argument("--round-size", type=int, default=50, help="requests per round")
    parser.add_argument("--seed-uploads", type=int, default=150, help="labelled seed batch")
    parser.add_argument("--replay-fraction", type=float, default=0.05)
    parser.add_argument("--conflict-fraction", type=float, default=0.01)
    parser.add_argument("--image-size", type=int, default=64, help="synthetic image side")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ["PECBIR_DATA"]) if os.environ.get("PECBIR_DATA") else None,
        help="figshare file or folder (default $PECBIR_DATA); synthetic images if not given",
    )
    parser.add_argument("--sample-interval", type=float, default=0.5, help="RSS sampling (s)")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument(
        "--shared-redis",
        action="store_true",
        help="use the Redis named by $PECBIR_TEST_REDIS_URL (never flushed) "
        "instead of a private redis-server with an append-only file",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/soak"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pecbir_harness.soak import SoakConfig, run_soak, soak_cluster

    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = SoakConfig(
        uploads=args.uploads,
        searches=args.searches,
        concurrency=args.concurrency,
        round_size=args.round_size,
        seed_uploads=args.seed_uploads,
        replay_fraction=args.replay_fraction,
        conflict_fraction=args.conflict_fraction,
        image_size=args.image_size,
        data=args.data,
        sample_interval_s=args.sample_interval,
        drain_timeout_s=args.drain_timeout,
        seed=args.seed,
        seal_processes=os.cpu_count() or 1,
    )
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        own_redis = False if args.shared_redis else None
        with soak_cluster(Path(tmp), own_redis=own_redis) as cluster:
            results = run_soak(cluster, cfg)
            results["redis"] = "private (AOF, fsync always)" if cluster.redis else "shared"
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }
    results["store"] = "Ceph radosgw S3 over HTTP (memstore OSD)"
    results["workers"] = "1 Celery worker, solo pool"
    write_report(results, args.out)
    return 0 if all(check["ok"] for check in results["checks"].values()) else 1


def _table(results: dict) -> str:
    verify = results["verify"]
    lines = [
        f"# Soak run ({results['source']}; {results['config']['uploads']} uploads + "
        f"{results['config']['searches']} searches, client concurrency {results['levels']}; "
        f"{results['machine']['cpus']} CPUs, load {results['load'].get('load1_mean', 0):.1f} "
        f"mean)",
        "",
        f"{results['requests']} requests in {results['mixed_s']:.0f} s mixed phase "
        f"({results['duration_s']:.0f} s in all, seed + train "
        f"{results['seed']['train_and_index_s']:.0f} s, drain {verify['drain_s']:.1f} s); "
        f"store: {results['store']}; {results['workers']}; Redis {results.get('redis', '?')}.",
        "",
        "| check | result | detail |",
        "|---|---|---|",
        *(
            f"| {name} | {'pass' if c['ok'] else 'FAIL'} | {c['detail']} |"
            for name, c in results["checks"].items()
        ),
        "",
        "| status | " + " | ".join(results["status_by_kind"]) + " |",
        "|---|" + "---|" * len(results["status_by_kind"]),
    ]
    codes = sorted({code for kinds in results["status_by_kind"].values() for code in kinds})
    for code in codes:
        counts = [str(kinds.get(code, 0)) for kinds in results["status_by_kind"].values()]
        lines.append(f"| {code} | " + " | ".join(counts) + " |")
    lines += [
        "",
        "| phase | request | n | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for table in ("latency_by_phase", "latency_by_concurrency"):
        prefix = "" if table == "latency_by_phase" else "c="
        for group, kinds in results[table].items():
            for kind, s in kinds.items():
                lines.append(
                    f"| {prefix}{group} | {kind} | {s['n']} | {s['p50']:.1f} | {s['p95']:.1f} "
                    f"| {s['p99']:.1f} | {s['max']:.0f} |"
                )
    lines += [
        "",
        "| process | start MiB | end MiB | peak MiB | mixed Q2 median | mixed Q4 median "
        "| growth | allowed | per 1000 requests | flat |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for role, m in results["memory"].items():
        judged = "pass" if m["flat"] else ("FAIL" if m["flat"] is False else "n/a")
        if not m["checked"]:
            per_upload = (
                (m["end_mib"] - m["start_mib"]) * 1024 / results["verify"]["acknowledged_ids"]
            )
            judged = f"not checked, holds the data ({per_upload:+.1f} KiB per stored upload)"
        q = (
            f"{m['q2_median_mib']:.1f} | {m['q4_median_mib']:.1f} | {m['growth_mib']:+.1f} MiB "
            f"({m['growth_pct']:+.1f} %) | {m['allowed_mib']:.1f} MiB"
            if "q2_median_mib" in m
            else "– | – | – | –"
        )
        per_1k = m.get("growth_kib_per_1k_requests")
        q += f" | {per_1k:+.0f} KiB" if per_1k is not None else " | –"
        lines.append(
            f"| {role} | {m['start_mib']:.1f} | {m['end_mib']:.1f} | {m['peak_mib']:.1f} | {q} "
            f"| {judged} |"
        )
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    samples = results["rss_samples"]
    fig, (ax_rss, ax_lat) = plt.subplots(1, 2, figsize=(14, 5))
    roles = sorted({role for s in samples for role in s["rss"]})
    for role in roles:
        points = [(s["t"], s["rss"][role] / 2**20) for s in samples if role in s["rss"]]
        ax_rss.plot(*zip(*points, strict=True), label=role, lw=1.2)
    spans: dict[str, list[float]] = {}
    for s in samples:
        spans.setdefault(s["phase"], [s["t"], s["t"]])[1] = s["t"]
    for i, (phase, (a, b)) in enumerate(spans.items()):
        ax_rss.axvspan(a, b, color="0.9" if i % 2 else "0.97", zorder=0)
        ax_rss.text((a + b) / 2, 1.0, phase, transform=ax_rss.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=7, rotation=20)  # fmt: skip
    ax_rss.set_xlabel("time since start (s)")
    ax_rss.set_ylabel("RSS (MiB, process + children)")
    ax_rss.legend(fontsize=8)
    ax_rss.set_title("resident memory per service process", pad=24)

    phases = list(results["latency_by_phase"])
    kinds = ["upload", "search", "replay", "conflict"]
    width = 0.8 / len(kinds)
    x = np.arange(len(phases))
    for k, kind in enumerate(kinds):
        for q, (pct, alpha) in enumerate((("p99", 0.3), ("p95", 0.6), ("p50", 1.0))):
            values = [results["latency_by_phase"][p].get(kind, {}).get(pct, 0) for p in phases]
            ax_lat.bar(x + k * width, values, width, color=f"C{k}", alpha=alpha,
                       label=f"{kind} {pct}" if q == 2 or k == 0 else None)  # fmt: skip
    ax_lat.set_xticks(x + width * (len(kinds) - 1) / 2, phases)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("client latency (ms): p50 solid, p95, p99 lighter")
    ax_lat.set_title("latency percentiles per phase")
    ax_lat.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    text = _table(results)
    (out / "soak.md").write_text(text)
    _plot(results, out / "soak.png")
    print(text)
    print(f"wrote {out / 'soak.json'}, {out / 'soak.md'} and {out / 'soak.png'}")
