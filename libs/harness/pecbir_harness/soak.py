"""Soak run against the services as real processes (issue 6).

A bounded mixed load (uploads with idempotency keys, some replayed, some conflicting;
searches) at varying client concurrency, while the resident memory of every service process
is sampled. Afterwards three properties are checked:

- every upload the gateway acknowledged (202) is searchable: the search service holds exactly
  the acknowledged ids, and the gateway reports a sample of them as `searchable`;
- the client saw no 5xx answer and no transport error;
- memory is flat: per service, the median RSS of the last quarter of the mixed phase is at most
  `growth_fraction` (+ `growth_slack_mib`) above the median of its second quarter (the first
  quarter is warm-up). radosgw's OSD (memstore) keeps every object in memory and Redis keeps
  the event stream, so they grow with the data by design; their numbers are reported, not checked.

A fourth check keeps the load honest: uploads answer 202, a replay with the same key and body
answers the original image id, a reused key with another body answers 409, searches answer 200.

`run_soak` drives an already started `pecbir_harness.procs.Cluster`; the CLI (`pecbir soak`) and the
integration test only size it differently.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from pecbir_contracts import routes
from pecbir_harness.workload import percentile, seal_for_upload

if TYPE_CHECKING:
    from pecbir_harness.procs import S3Bucket

__all__ = [
    "CHECKED_ROLES",
    "DATASET_MODEL",
    "SYNTHETIC_MODEL",
    "MiB",
    "Op",
    "Progress",
    "Record",
    "RssSampler",
    "Sealed",
    "SoakClient",
    "SoakConfig",
    "checks",
    "load_images",
    "memory_report",
    "run_soak",
    "schedule",
    "seal_pool",
    "soak_cluster",
]

MiB = 1024 * 1024
# Model for 64×64 synthetic slices (ROI radius ≤ size/8 keeps patches inside the image).
SYNTHETIC_MODEL = {
    "n_components": 8,
    "n_regions": 4,
    "patch_size": 5,
    "radius": 6,
    "n_train_patches": 20_000,
    "dim": 8,
}
DATASET_MODEL = {"n_components": 16, "n_train_patches": 60_000}
CHECKED_ROLES = ("gateway", "search", "worker")


@dataclass
class SoakConfig:
    uploads: int = 2000
    searches: int = 5000
    concurrency: int = 8
    round_size: int = 50
    seed_uploads: int = 150
    replay_fraction: float = 0.05
    conflict_fraction: float = 0.01
    image_size: int = 64
    data: Path | None = None
    model: dict[str, object] | None = None
    collection: str = "soak"
    sample_interval_s: float = 0.5
    drain_timeout_s: float = 300.0
    status_sample: int = 50
    growth_fraction: float = 0.10
    growth_slack_mib: float = 8.0
    seed: int = 0
    seal_processes: int = 1
    progress: bool = True

    def levels(self) -> list[int]:
        """Concurrency levels the rounds cycle through: 1, 2, 4, … and `concurrency`."""
        levels = {1, self.concurrency}
        level = 2
        while level < self.concurrency:
            levels.add(level)
            level *= 2
        return sorted(levels)


@dataclass
class Sealed:
    cipher: bytes
    mask: bytes
    meta: str


@dataclass
class Op:
    kind: str  # upload | replay | conflict | search
    item: int  # index into the sealed pool (body); for replay/conflict the upload it repeats
    key: str | None = None
    body: int | None = None  # conflict: the other body sent under the same key


@dataclass
class Record:
    kind: str
    phase: str
    concurrency: int
    t: float
    ms: float
    status: int | None  # None: transport error
    detail: str = ""


@dataclass
class Progress:
    """What the load loop shares with its threads (guarded by `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, str] = field(default_factory=dict)  # idempotency key → image id
    replay_ids: list[tuple[str, str]] = field(default_factory=list)  # (key, id answered)
    done: dict[str, threading.Event] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    surprises: list[str] = field(default_factory=list)
    n_database: list[tuple[float, int]] = field(default_factory=list)


class RssSampler:
    """Samples the RSS (process + children) of every service process in a thread."""

    def __init__(self, pids: Callable[[], dict[str, int]], interval_s: float, t0: float) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.t0 = t0
        self.phase = "start"
        self.samples: list[dict[str, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        import psutil

        handles: dict[int, psutil.Process] = {}
        while not self._stop.is_set():
            rss: dict[str, int] = {}
            for role, pid in self.pids().items():
                try:
                    proc = handles.get(pid) or handles.setdefault(pid, psutil.Process(pid))
                    total = proc.memory_info().rss
                    for child in proc.children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            total += child.memory_info().rss
                    rss[role] = total
                except psutil.Error:
                    continue
            self.samples.append(
                {
                    "t": time.monotonic() - self.t0,
                    "phase": self.phase,
                    "load1": os.getloadavg()[0],
                    "rss": rss,
                }
            )
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def load_images(cfg: SoakConfig, n: int):
    """(images, masks, labels, source): dataset slices if `cfg.data`, else synthetic ones."""
    if cfg.data is not None:
        from pecore.datasets import DATA_FILE_NAME, load_figshare

        path = Path(cfg.data)
        path = path / DATA_FILE_NAME if path.is_dir() else path
        data = load_figshare(path, cache_dir=Path("cache"))
        # A random subset: the file is ordered by class, the seed batch needs all of them.
        rows = np.random.default_rng(cfg.seed).permutation(len(data))[:n]
        if len(rows) < n:
            raise ValueError(f"{path} holds {len(data)} images, the soak needs {n}")
        labels = np.asarray(data.labels)[rows]
        return [data.images[r] for r in rows], [data.masks[r] for r in rows], labels, "figshare"
    from pecore.datasets import make_synthetic

    data = make_synthetic(n_images=n, size=cfg.image_size, seed=cfg.seed)
    return data.images, data.masks, data.labels, f"synthetic {cfg.image_size}x{cfg.image_size}"


def seal_pool(cfg: SoakConfig, n: int) -> tuple[list[Sealed], str, float]:
    """Protect n images owner-side as the encryptor does (one key each, tagged); the bodies."""
    from tqdm import tqdm

    from pecore.keys import MasterKey

    images, masks, labels, source = load_images(cfg, n)
    secret = MasterKey.generate().secret.get_secret_value()
    run = uuid.uuid4().hex[:8]
    jobs = [(secret, images[i], masks[i], f"soak-{run}-{i:06d}", int(labels[i])) for i in range(n)]
    bar = dict(total=n, desc="owner: encrypt", unit="img", disable=not cfg.progress)
    if cfg.seal_processes > 1:
        with ProcessPoolExecutor(cfg.seal_processes) as pool:
            sealed = list(tqdm(pool.map(seal_for_upload, jobs, chunksize=16), **bar))
    else:
        sealed = [seal_for_upload(job) for job in tqdm(jobs, **bar)]
    seconds = statistics.fmean(s[3] for s in sealed)
    return [Sealed(c, m, meta) for c, m, meta, _ in sealed], source, seconds


def schedule(cfg: SoakConfig, first: int, run: str) -> list[list[Op]]:
    """Rounds of operations: `cfg.uploads` uploads (pool items `first`, `first + 1`, …, each
    under its own idempotency key) shuffled with `cfg.searches` searches, plus replays and
    conflicts.

    A replay follows its upload within a few rounds, sometimes in the same round (then the
    two race in the gateway); a conflict comes in a later round than its upload.
    """
    rng = np.random.default_rng(cfg.seed + 1)
    kinds = np.array(["upload"] * cfg.uploads + ["search"] * cfg.searches)
    rng.shuffle(kinds)
    pool_size = first + cfg.uploads
    flat: list[Op] = []
    upload_no = 0
    for kind in kinds:
        if kind == "upload":
            item = first + upload_no
            flat.append(Op("upload", item, key=f"soak-{run}-{upload_no:06d}"))
            upload_no += 1
        else:
            flat.append(Op("search", int(rng.integers(pool_size))))
    rounds = [flat[i : i + cfg.round_size] for i in range(0, len(flat), cfg.round_size)]
    uploads = [(r, op) for r, ops in enumerate(rounds) for op in ops if op.kind == "upload"]
    n_replays = round(cfg.replay_fraction * len(uploads))
    n_conflicts = round(cfg.conflict_fraction * len(uploads))
    chosen = [int(i) for i in rng.permutation(len(uploads))]
    # Conflicts need a later round; replays and conflicts go to different uploads.
    conflicted = [i for i in chosen if uploads[i][0] + 1 < len(rounds)][:n_conflicts]
    taken = set(conflicted)
    replayed = [i for i in chosen if i not in taken][:n_replays]
    extra: dict[int, list[Op]] = defaultdict(list)
    for index in replayed:
        r, op = uploads[index]
        later = min(r + int(rng.integers(0, 3)), len(rounds) - 1)
        extra[later].append(Op("replay", op.item, key=op.key))
    for index in conflicted:
        r, op = uploads[index]
        other = first + int(rng.integers(cfg.uploads - 1))
        other += other >= op.item  # any other body
        later = min(r + 1 + int(rng.integers(0, 2)), len(rounds) - 1)
        extra[later].append(Op("conflict", op.item, key=op.key, body=other))
    for r, ops in extra.items():
        for op in ops:
            # Behind its own upload when in the same round; anywhere in a later one.
            own = next((i for i, o in enumerate(rounds[r]) if o.key == op.key), -1)
            rounds[r].insert(int(rng.integers(own + 1, len(rounds[r]) + 1)), op)
    return rounds


def _phase_of(round_no: int, n_rounds: int) -> str:
    return f"mixed-q{1 + min(3, 4 * round_no // max(1, n_rounds))}"


class SoakClient:
    """The load generator: one HTTP connection pool shared by the threads."""

    def __init__(self, cluster, cfg: SoakConfig, pool: list[Sealed], t0: float) -> None:
        self.cfg = cfg
        self.pool = pool
        self.t0 = t0
        self.http = httpx.Client(
            base_url=cluster.gateway_url,
            headers={"authorization": f"Bearer {cluster.token()}"},
            timeout=120,
            limits=httpx.Limits(max_connections=4 * cfg.concurrency + 8),
        )
        self.state = Progress()

    def close(self) -> None:
        self.http.close()

    def _timed(self, kind: str, phase: str, level: int, send) -> httpx.Response | None:
        started = time.monotonic()
        try:
            answer = send()
        except httpx.HTTPError as exc:
            answer, status, detail = None, None, f"{type(exc).__name__}: {exc}"
        else:
            status = answer.status_code
            detail = answer.text[:300] if status >= 400 else ""
        record = Record(
            kind,
            phase,
            level,
            started - self.t0,
            (time.monotonic() - started) * 1000,
            status,
            detail,
        )
        with self.state.lock:
            self.state.records.append(record)
        return answer

    def _upload_files(self, item: int) -> dict:
        body = self.pool[item]
        return {
            "cipher": ("c.png", body.cipher, "image/png"),
            "mask": ("m.png", body.mask, "image/png"),
            "metadata": (None, body.meta),
        }

    def upload(self, op: Op, phase: str, level: int) -> None:
        headers = {"Idempotency-Key": op.key} if op.key else {}
        item = op.body if op.kind == "conflict" else op.item
        if op.kind == "conflict":
            # Only after the original was answered: otherwise the conflict could come first.
            self.state.done[op.key].wait(300)
        answer = self._timed(
            op.kind,
            phase,
            level,
            lambda: self.http.post(
                routes.GATEWAY_IMAGES.format(collection=self.cfg.collection),
                files=self._upload_files(item),
                headers=headers,
            ),
        )
        state = self.state
        if op.kind == "upload":
            state.done[op.key].set()
        if answer is None:
            return
        expected = 409 if op.kind == "conflict" else 202
        with state.lock:
            if answer.status_code != expected:
                state.surprises.append(
                    f"{op.kind} {op.key}: {answer.status_code} (expected {expected}) "
                    f"{answer.text[:200]}"
                )
                return
            if expected == 202:
                image_id = answer.json()["image_id"]
                if op.kind == "replay":
                    state.replay_ids.append((op.key, image_id))
                known = state.acked.setdefault(op.key, image_id)
                if known != image_id:
                    state.surprises.append(
                        f"{op.kind} {op.key}: answered {image_id}, the key already gave {known}"
                    )

    def search(self, op: Op, phase: str, level: int) -> None:
        body = self.pool[op.item]
        answer = self._timed(
            "search",
            phase,
            level,
            lambda: self.http.post(
                routes.GATEWAY_SEARCH.format(collection=self.cfg.collection),
                files={
                    "cipher": ("q.png", body.cipher, "image/png"),
                    "mask": ("m.png", body.mask, "image/png"),
                },
                data={"k": "10"},
            ),
        )
        if answer is None:
            return
        with self.state.lock:
            if answer.status_code != 200:
                self.state.surprises.append(
                    f"search: {answer.status_code} (expected 200) {answer.text[:200]}"
                )
                return
            result = answer.json()
            if len(result["hits"]) != min(10, result["n_database"]):
                self.state.surprises.append(
                    f"search: {len(result['hits'])} hits from {result['n_database']} vectors"
                )
            self.state.n_database.append((time.monotonic() - self.t0, result["n_database"]))

    def run(self, op: Op, phase: str, level: int) -> None:
        try:
            if op.kind == "search":
                self.search(op, phase, level)
            else:
                self.upload(op, phase, level)
        except Exception as exc:
            # A malformed answer (not the JSON the schema promises) is a finding, not a crash.
            with self.state.lock:
                self.state.surprises.append(f"{op.kind}: {type(exc).__name__}: {exc}")
            if op.kind == "upload" and op.key in self.state.done:
                self.state.done[op.key].set()

    def model_status(self) -> dict:
        return self.http.get(routes.GATEWAY_MODEL.format(collection=self.cfg.collection)).json()

    def wait_vectors(self, count: int, timeout: float, what: str) -> tuple[bool, dict]:
        """Until the serving version is the indexing one and holds `count` vectors."""
        from tqdm import tqdm

        deadline = time.monotonic() + timeout
        bar = tqdm(total=count, desc=what, unit="vec", disable=not self.cfg.progress)
        status: dict = {}
        try:
            while True:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    status = self.model_status()
                serving = status.get("serving_version")
                held = (
                    status.get("n_vectors", 0) if serving == status.get("indexing_version") else 0
                )
                bar.n = min(held, count)
                bar.refresh()
                if serving and held >= count:
                    return True, status
                if time.monotonic() > deadline:
                    return False, status
                time.sleep(0.25)
        finally:
            bar.close()


def _seed_and_train(client: SoakClient, cfg: SoakConfig, sampler: RssSampler) -> dict:
    """Labelled templates, one model version, wait until it serves them all."""
    sampler.phase = "seed"
    keys = [f"seed-{uuid.uuid4().hex[:12]}-{i:05d}" for i in range(cfg.seed_uploads)]
    with ThreadPoolExecutor(2) as pool:
        for key, item in zip(keys, range(cfg.seed_uploads), strict=True):
            client.state.done[key] = threading.Event()
            pool.submit(client.run, Op("upload", item, key=key), "seed", 2)
    started = time.monotonic()
    answer = client.http.post(
        routes.GATEWAY_MODEL_TRAIN.format(collection=cfg.collection), json=cfg.model
    )
    if answer.status_code != 202:
        raise RuntimeError(f"training refused: {answer.status_code} {answer.text}")
    version = answer.json()["version"]
    deadline = time.monotonic() + cfg.drain_timeout_s
    while True:
        state = client.http.get(
            routes.GATEWAY_MODEL_VERSION.format(collection=cfg.collection, version=version)
        ).json()
        if state["state"] == "trained":
            break
        if state["state"] == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"training did not finish: {state}")
        time.sleep(0.5)
    n_seed = len(client.state.acked)
    ok, status = client.wait_vectors(n_seed, cfg.drain_timeout_s, "seed: index")
    if not ok:
        raise RuntimeError(f"the seed batch was not indexed in time: {status}")
    return {
        "version": version,
        "seed_acknowledged": n_seed,
        "train_and_index_s": time.monotonic() - started,
    }


def _verify(client: SoakClient, cluster, cfg: SoakConfig) -> dict:
    """Every acknowledged id held by the search service; a sample `searchable` via the gateway."""
    acked = sorted(set(client.state.acked.values()))
    started = time.monotonic()
    reached, status = client.wait_vectors(len(acked), cfg.drain_timeout_s, "drain: index")
    drain_s = time.monotonic() - started

    def search_token(request: httpx.Request) -> None:
        # The search service takes only the gateway's short-lived tokens: a fresh one each.
        request.headers["authorization"] = f"Bearer {cluster.search_token()}"

    search = httpx.Client(
        base_url=cluster.search_url, event_hooks={"request": [search_token]}, timeout=30
    )
    missing: list[str] = []
    with search:
        for image_id in acked:
            held = search.get(
                routes.SEARCH_IMAGE.format(collection=cfg.collection, image_id=image_id)
            )
            if held.status_code != 200:
                missing.append(image_id)
        final = search.get(routes.SEARCH_STATUS.format(collection=cfg.collection)).json()
    rng = np.random.default_rng(cfg.seed + 2)
    sample = [acked[i] for i in rng.permutation(len(acked))[: cfg.status_sample]]
    not_searchable = []
    for image_id in sample:
        state = (
            client.http.get(
                routes.GATEWAY_IMAGE_STATUS.format(collection=cfg.collection, image_id=image_id)
            )
            .json()
            .get("state")
        )
        if state != "searchable":
            not_searchable.append((image_id, state))
    return {
        "acknowledged_ids": len(acked),
        "drain_reached": reached,
        "drain_s": drain_s,
        "model_status": status,
        "search_status": final,
        "held_by_search": len(acked) - len(missing),
        "missing": missing[:20],
        "n_missing": len(missing),
        "search_n_vectors": final.get("n_vectors"),
        "gateway_status_sample": len(sample),
        "gateway_not_searchable": not_searchable[:20],
    }


def _latency_table(records: list[Record], by: str) -> dict[str, dict[str, dict[str, float]]]:
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.status is not None:
            groups[str(getattr(record, by))][record.kind].append(record.ms)
    # Groups in the order they happened (seed, mixed-q1…q4; concurrency levels by value).
    order = sorted(groups, key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else 0))
    if by == "phase":
        first = {}
        for record in records:
            first.setdefault(record.phase, record.t)
        order = sorted(groups, key=first.__getitem__)
    return {
        group: {
            kind: {
                "n": len(values),
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "p99": percentile(values, 99),
                "max": max(values),
            }
            for kind, values in sorted(kinds.items())
        }
        for group, kinds in ((g, groups[g]) for g in order)
    }


def memory_report(
    samples: list[dict], cfg: SoakConfig, request_times: list[float] | None = None
) -> dict[str, dict[str, object]]:
    """Per process: start/end/peak RSS and the Q2 → Q4 median growth of the mixed phase.

    With `request_times` also the growth per 1000 requests sent between the middles of Q2
    and Q4 (a leak per request shows there however short the run).
    """
    mixed = [s for s in samples if str(s["phase"]).startswith("mixed")]
    roles = sorted({role for s in samples for role in s["rss"]})
    report: dict[str, dict[str, object]] = {}
    if not mixed:
        return report
    t_start, t_end = mixed[0]["t"], mixed[-1]["t"]
    span = max(t_end - t_start, 1e-9)

    def quarter(s: dict) -> int:
        return min(3, int(4 * (s["t"] - t_start) / span))

    mid_q2, mid_q4 = t_start + 0.375 * span, t_start + 0.875 * span
    between = sum(mid_q2 <= t <= mid_q4 for t in request_times or [])

    for role in roles:
        series = [(s["t"], s["rss"][role]) for s in samples if role in s["rss"]]
        in_mixed = [(quarter(s), s["rss"][role]) for s in mixed if role in s["rss"]]
        q2 = [v for q, v in in_mixed if q == 1]
        q4 = [v for q, v in in_mixed if q == 3]
        entry: dict[str, object] = {
            "checked": role in CHECKED_ROLES,
            "start_mib": series[0][1] / MiB,
            "end_mib": series[-1][1] / MiB,
            "peak_mib": max(v for _, v in series) / MiB,
            "samples": len(series),
        }
        if q2 and q4:
            q2_mib, q4_mib = statistics.median(q2) / MiB, statistics.median(q4) / MiB
            allowed = cfg.growth_fraction * q2_mib + cfg.growth_slack_mib
            entry.update(
                q2_median_mib=q2_mib,
                q4_median_mib=q4_mib,
                growth_mib=q4_mib - q2_mib,
                growth_pct=100 * (q4_mib - q2_mib) / q2_mib,
                allowed_mib=allowed,
                flat=q4_mib - q2_mib <= allowed,
            )
            if between:
                entry["growth_kib_per_1k_requests"] = (q4_mib - q2_mib) * 1024 * 1000 / between
        else:
            entry["flat"] = None  # too few samples in the mixed phase to judge
        report[role] = entry
    return report


def run_soak(cluster, cfg: SoakConfig, pool: list[Sealed] | None = None) -> dict[str, object]:
    """Seed + train, the mixed load, drain and verify; returns the results with `checks`."""
    from tqdm import tqdm

    t0 = time.monotonic()
    cfg.model = cfg.model or (DATASET_MODEL if cfg.data else SYNTHETIC_MODEL)
    source, seal_s = "given", float("nan")
    if pool is None:
        pool, source, seal_s = seal_pool(cfg, cfg.seed_uploads + cfg.uploads)
    if len(pool) < cfg.seed_uploads + cfg.uploads:
        raise ValueError(f"pool of {len(pool)} bodies < {cfg.seed_uploads + cfg.uploads}")
    run = uuid.uuid4().hex[:8]
    rounds = schedule(cfg, cfg.seed_uploads, run)
    levels = cfg.levels()
    rng = np.random.default_rng(cfg.seed + 3)
    order: list[int] = []
    client = SoakClient(cluster, cfg, pool, t0)
    results: dict[str, object] = {"source": source, "encrypt_ms_per_image": seal_s * 1000}
    try:
        with RssSampler(cluster.service_pids, cfg.sample_interval_s, t0) as sampler:
            results["seed"] = _seed_and_train(client, cfg, sampler)
            for ops in rounds:
                for op in ops:
                    if op.kind == "upload":
                        client.state.done[op.key] = threading.Event()
            mixed_started = time.monotonic()
            bar = tqdm(
                total=sum(len(ops) for ops in rounds),
                desc="soak: mixed",
                unit="req",
                disable=not cfg.progress,
            )
            for round_no, ops in enumerate(rounds):
                if not order:
                    order = list(rng.permutation(levels))
                level = int(order.pop())
                phase = _phase_of(round_no, len(rounds))
                sampler.phase = phase
                with ThreadPoolExecutor(level) as threads:
                    for op in ops:
                        future = threads.submit(client.run, op, phase, level)
                        future.add_done_callback(lambda _f: bar.update())
                bar.set_postfix(c=level, acked=len(client.state.acked))
            bar.close()
            results["mixed_s"] = time.monotonic() - mixed_started
            sampler.phase = "drain"
            results["verify"] = _verify(client, cluster, cfg)
        results["duration_s"] = time.monotonic() - t0
    finally:
        client.close()
    state = client.state
    records = state.records
    statuses = Counter(
        str(r.status) if r.status is not None else "transport-error" for r in records
    )
    by_kind: dict[str, Counter] = {
        kind: Counter() for kind in ("seed upload", "upload", "replay", "conflict", "search")
    }
    for r in records:
        kind = "seed upload" if r.phase == "seed" else r.kind
        by_kind[kind]["transport-error" if r.status is None else str(r.status)] += 1
    by_kind = {kind: dict(sorted(counts.items())) for kind, counts in by_kind.items()}
    results.update(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        requests=len(records),
        status_counts=dict(sorted(statuses.items())),
        status_by_kind=by_kind,
        server_errors=[asdict(r) for r in records if r.status is not None and r.status >= 500][:20],
        transport_errors=[asdict(r) for r in records if r.status is None][:20],
        surprises=state.surprises[:50],
        n_surprises=len(state.surprises),
        replays_answered=len(state.replay_ids),
        latency_by_phase=_latency_table(records, "phase"),
        latency_by_concurrency=_latency_table(records, "concurrency"),
        memory=memory_report(sampler.samples, cfg, [r.t for r in records]),
        rss_samples=sampler.samples,
        n_database=state.n_database[:: max(1, len(state.n_database) // 500)],
        load=_load_summary(sampler.samples),
        levels=levels,
        rounds=len(rounds),
    )
    results["checks"] = checks(results)
    return results


def _load_summary(samples: list[dict]) -> dict[str, float]:
    loads = [s["load1"] for s in samples]
    if not loads:
        return {}
    return {
        "cpus": os.cpu_count() or 0,
        "load1_start": loads[0],
        "load1_end": loads[-1],
        "load1_mean": statistics.fmean(loads),
        "load1_max": max(loads),
    }


def checks(results: dict) -> dict[str, dict[str, object]]:
    verify = results["verify"]
    statuses = results["status_counts"]
    n5xx = sum(n for code, n in statuses.items() if code.isdigit() and int(code) >= 500)
    transport = statuses.get("transport-error", 0)
    memory = results["memory"]
    judged = {role: m["flat"] for role, m in memory.items() if m["checked"]}
    return {
        "acknowledged_searchable": {
            "ok": bool(
                verify["drain_reached"]
                and verify["n_missing"] == 0
                and verify["search_n_vectors"] == verify["acknowledged_ids"]
                and not verify["gateway_not_searchable"]
            ),
            "detail": (
                f"{verify['held_by_search']}/{verify['acknowledged_ids']} acknowledged ids held "
                f"by search ({verify['search_n_vectors']} vectors), "
                f"{verify['gateway_status_sample'] - len(verify['gateway_not_searchable'])}/"
                f"{verify['gateway_status_sample']} sampled 'searchable' via the gateway, "
                f"drained in {verify['drain_s']:.1f} s"
            ),
        },
        "no_5xx": {
            "ok": n5xx == 0 and transport == 0,
            "detail": f"{n5xx} answers ≥ 500, {transport} transport errors",
        },
        "memory_flat": {
            "ok": bool(judged) and all(flat is True for flat in judged.values()),
            "detail": ", ".join(
                f"{role} {memory[role].get('growth_mib', float('nan')):+.1f} MiB "
                f"(allowed {memory[role].get('allowed_mib', float('nan')):.1f})"
                for role in judged
            ),
        },
        "answers_as_expected": {
            "ok": results["n_surprises"] == 0,
            "detail": f"{results['n_surprises']} unexpected answers; "
            f"{results['replays_answered']} replays answered with the original id",
        },
    }


@contextlib.contextmanager
def soak_cluster(
    tmp: Path, own_redis: bool | None = None, s3: S3Bucket | None = None
) -> Iterator[object]:
    """The cluster a soak runs against: a private, durable Redis when the binary exists
    (its memory can then be sampled too), else the helpers' shared-Redis convention; the
    bucket `s3` (a `procs.S3Bucket`) or else a private radosgw."""
    import shutil

    from pecbir_harness.procs import Cluster

    if own_redis is None:
        own_redis = shutil.which("redis-server") is not None
    with Cluster(tmp, encryptor=False, own_redis=own_redis, s3=s3) as cluster:
        yield cluster
