"""Recovery from hard kills, measured (issue 15): a seeded fault loop over the real processes.

`run_loop` drives an already started `pecbir_harness.procs.Cluster` (two workers, own Redis,
radosgw S3, started with `recovery_env`): it seeds a collection and trains its first model,
then uploads images — most with an Idempotency-Key and retried with the same key until they
are acknowledged, some without a key and never retried (a failed one may leave debris) —
while a fault thread injects seeded faults one after the other:

- ``worker_mid_task``: kill -9 of the worker running an index task (held by the test hook);
- ``worker_random``: kill -9 of a random worker at a random moment;
- ``worker_mid_training``: a new training is requested and its worker killed mid-training;
- ``redis``: kill -9 of Redis, restarted 2–4 s later (append-only, fsync always);
- ``search``: kill -9 of the search service, restarted;
- ``gateway``: kill -9 of the gateway with uploads in flight, restarted;
- ``store``: the object store's gateway (radosgw) killed mid-request, back 2–4 s later;
- ``search_while_redis_down``: overlapping — Redis killed, then the search service killed
  and started again while Redis is still down.

Killed workers and services are started again at once (as Kubernetes would). After the last
fault the loop waits for quiet: every acknowledged image searchable, the janitor's grace
period passed. It reports acknowledged, lost (acknowledged, never searchable by the end of
the settle time), duplicated (a key answered with two image ids, or an image stored twice),
debris left, ack→searchable percentiles and the time from the end of the last fault to
all-searchable; `checks` judges them. `pecbir recovery` runs several loops; the integration
test (tests/services/test_recovery_faults.py) one short one.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from pecbir_contracts import routes
from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.png import encode_png
from pecbir_harness.workload import percentile

__all__ = [
    "FAULT_KINDS",
    "NOT_INJECTED",
    "RecoveryConfig",
    "as_dict",
    "checks",
    "recovery_env",
    "run_loop",
    "summary",
]

FAULT_KINDS = (
    "worker_mid_task",
    "worker_random",
    "worker_mid_training",
    "redis",
    "search",
    "gateway",
    "store",
    "search_while_redis_down",
)
# The start of a fault's description when it could not be injected (not counted).
NOT_INJECTED = "not injected"
MODEL = {
    "n_components": 4,
    "n_regions": 2,
    "patch_size": 5,
    "radius": 2,
    "n_train_patches": 2000,
    "dim": 2,
}


@dataclass
class RecoveryConfig:
    """One loop's size and the recovery settings the cluster runs with."""

    uploads: int = 300
    faults: int = 12
    seed: int = 0
    image_size: int = 48
    upload_threads: int = 3
    # Seconds between two uploads of one thread (spreads the uploads over the faults).
    upload_pace_s: float = 0.05
    unkeyed_fraction: float = 0.1
    seed_uploads: int = 12
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    # Gaps between faults (seconds, uniform).
    fault_gap_s: tuple[float, float] = (1.0, 4.0)
    settle_timeout_s: float = 240.0
    # The recovery settings (recovery_env): kept short so that a loop ends in minutes.
    redelivery_bound_s: float = 10.0
    reconcile_interval_s: float = 2.0
    janitor_interval_s: float = 4.0
    train_lease_s: float = 6.0
    debris_grace_s: float = 5.0
    # Small, so that the search restarts of a loop start from snapshots (plus a few records).
    snapshot_min_records: int = 32
    # Above every task: only the reconciler brings a killed worker's index work back in time.
    visibility_timeout_s: int = 3600


def recovery_env(cfg: RecoveryConfig, delay_file: Path, train_delay_file: Path) -> dict[str, str]:
    """The environment of a cluster the loop can drive (the test hooks and recovery bounds).

    Parameters
    ----------
    cfg
        The loop's configuration.
    delay_file, train_delay_file
        Files the fault thread writes to hold an index task or a training (test hooks).

    Returns
    -------
    dict of str to str
        Extra environment for `procs.Cluster`.
    """
    return {
        "PECBIR_VISIBILITY_TIMEOUT_S": str(cfg.visibility_timeout_s),
        "PECBIR_RECONCILE_INTERVAL_S": str(cfg.reconcile_interval_s),
        "PECBIR_JANITOR_INTERVAL_S": str(cfg.janitor_interval_s),
        "PECBIR_REDELIVERY_BOUND_S": str(cfg.redelivery_bound_s),
        "PECBIR_TRAIN_LEASE_S": str(cfg.train_lease_s),
        "PECBIR_DEBRIS_GRACE_S": str(cfg.debris_grace_s),
        "PECBIR_SNAPSHOT_MIN_RECORDS": str(cfg.snapshot_min_records),
        "PECBIR_TEST_INDEX_DELAY_FILE": str(delay_file),
        "PECBIR_TEST_TRAIN_DELAY_FILE": str(train_delay_file),
        "PECBIR_MAX_RETRIES": "12",
    }


def _image(rng: np.random.Generator, side: int) -> tuple[bytes, bytes, int]:
    rows, cols = np.mgrid[:side, :side]
    label = int(rng.integers(1, 4))
    cy, cx = side // 2 + rng.integers(-4, 5), side // 2 + rng.integers(-4, 5)
    mask = (rows - cy) ** 2 + (cols - cx) ** 2 <= (side / 5) ** 2
    image = rng.normal(60, 10, (side, side))
    tumour = {1: rng.normal(200, 5, image.shape), 2: rng.normal(120, 40, image.shape)}.get(
        label, 90 + 80 * (np.sin(cols / 1.5) > 0)
    )
    image[mask] = tumour[mask]
    cipher = (np.clip(image, 0, 255) // 16).astype(np.uint8)  # any uint8 image will do
    return encode_png(cipher), encode_png(mask), label


def _files(rng: np.random.Generator, side: int, opaque_id: str) -> dict:
    cipher, mask, label = _image(rng, side)
    meta = {
        "opaque_id": opaque_id,
        "role": "template",
        "label": label,
        "height": side,
        "width": side,
        "key": {"scheme": "ours", "mode": "per-image", "counter": 0, "check": "0123456789abcdef"},
    }
    return {
        "cipher": ("c.png", cipher, "image/png"),
        "mask": ("m.png", mask, "image/png"),
        "metadata": (None, json.dumps(meta)),
    }


@dataclass
class _Upload:
    key: str | None
    acked_at: float | None = None
    image_id: str | None = None
    ids_answered: set[str] = field(default_factory=set)
    attempts: int = 0
    statuses: Counter = field(default_factory=Counter)
    searchable_at: float | None = None


class _Loop:
    def __init__(self, cluster: Any, cfg: RecoveryConfig, collection: str) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.collection = collection
        self.rng = random.Random(cfg.seed)
        self.layout = CollectionLayout(cluster.tenant, collection)
        self.uploads: list[_Upload] = []
        self.lock = threading.Lock()
        self.faults: list[dict] = []
        self.faults_done = threading.Event()
        self.last_fault_end = 0.0
        self.killed_trainings: list[str] = []
        self.planted_debris: list[str] = []
        # (seconds since the epoch, 1-minute load average) every few seconds of the loop.
        self.load_samples: list[tuple[float, float]] = []

    # -- clients ------------------------------------------------------------------------------
    def gateway(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.cluster.gateway_url,
            headers={"authorization": f"Bearer {self.cluster.token()}"},
            timeout=timeout,
        )

    def _post_until_acknowledged(self, client: httpx.Client, upload: _Upload, files: dict):
        deadline = time.monotonic() + self.cfg.settle_timeout_s
        while time.monotonic() < deadline:
            upload.attempts += 1
            headers = {"Idempotency-Key": upload.key} if upload.key else {}
            client.base_url = self.cluster.gateway_url
            try:
                answer = client.post(
                    routes.GATEWAY_IMAGES.format(collection=self.collection),
                    files=files,
                    headers=headers,
                )
            except httpx.HTTPError as exc:
                upload.statuses[type(exc).__name__] += 1
            else:
                upload.statuses[str(answer.status_code)] += 1
                if answer.status_code == 202:
                    image_id = answer.json()["image_id"]
                    upload.ids_answered.add(image_id)
                    if upload.image_id is None:
                        upload.image_id, upload.acked_at = image_id, time.time()
                    return
                if answer.status_code < 500 and answer.status_code != 429:
                    return  # a client error: no retry helps (reported as a surprise)
            if upload.key is None:
                return  # without a key a retry would store a second image: abandoned
            time.sleep(0.5)

    def _uploader(self, start: int, step: int) -> None:
        client = self.gateway()
        rng = np.random.default_rng(self.cfg.seed * 100_003 + start)
        for index in range(start, self.cfg.uploads, step):
            keyed = rng.random() >= self.cfg.unkeyed_fraction
            key = f"recovery-{self.cfg.seed}-{self.collection}-{index:06d}" if keyed else None
            upload = _Upload(key)
            with self.lock:
                self.uploads.append(upload)
            files = _files(rng, self.cfg.image_size, f"rec-{self.collection}-{index:06d}")
            self._post_until_acknowledged(client, upload, files)
            time.sleep(self.cfg.upload_pace_s)

    def _one_more_upload(self) -> None:
        """An upload of its own (in a thread) so that an index task starts now."""
        index = self.cfg.uploads + len(self.faults)
        upload = _Upload(f"recovery-{self.cfg.seed}-{self.collection}-extra-{index:06d}")
        with self.lock:
            self.uploads.append(upload)
        rng = np.random.default_rng(self.cfg.seed * 100_003 + index)
        files = _files(rng, self.cfg.image_size, f"rec-{self.collection}-{index:06d}")
        threading.Thread(
            target=self._post_until_acknowledged, args=(self.gateway(), upload, files), daemon=True
        ).start()

    # -- seeding --------------------------------------------------------------------------------
    def seed(self) -> None:
        client = self.gateway()
        rng = np.random.default_rng(self.cfg.seed + 7)
        for index in range(self.cfg.seed_uploads):
            upload = _Upload(f"recovery-seed-{self.cfg.seed}-{self.collection}-{index:04d}")
            self._post_until_acknowledged(
                client, upload, _files(rng, self.cfg.image_size, f"seed-{index:04d}")
            )
            self.uploads.append(upload)
        self.train(client)
        self.wait_searchable(self.cfg.settle_timeout_s)

    def train(self, client: httpx.Client) -> str:
        answer = client.post(
            routes.GATEWAY_MODEL_TRAIN.format(collection=self.collection), json=MODEL
        )
        if answer.status_code != 202:
            raise RuntimeError(f"training was refused: {answer.status_code} {answer.text}")
        return answer.json()["version"]

    # -- searchability --------------------------------------------------------------------------
    def _search(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.cluster.search_url,
            headers={"authorization": f"Bearer {self.cluster.search_token()}"},
            timeout=10,
        )

    def poll_searchable(self) -> int:
        """Mark acknowledged uploads the search service serves; the number still pending."""
        with self.lock:
            pending = [u for u in self.uploads if u.image_id and u.searchable_at is None]
        if not pending:
            return 0
        try:
            with self._search() as search:
                status = search.get(
                    routes.SEARCH_STATUS.format(collection=self.collection),
                    params={"owner": self.cluster.tenant},
                )
                serving = status.json().get("serving_version") if status.is_success else None
                left = 0
                for upload in pending:
                    held = search.get(
                        routes.SEARCH_IMAGE.format(
                            collection=self.collection, image_id=upload.image_id
                        ),
                        params={"owner": self.cluster.tenant},
                    )
                    if held.status_code == 200 and held.json().get("version") == serving:
                        upload.searchable_at = time.time()
                    else:
                        left += 1
                return left
        except httpx.HTTPError:
            return len(pending)

    def wait_searchable(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll_searchable() == 0:
                return True
            time.sleep(0.5)
        return self.poll_searchable() == 0

    def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.load_samples or time.time() - self.load_samples[-1][0] >= 5.0:
                self.load_samples.append((time.time(), os.getloadavg()[0]))
            self.poll_searchable()
            stop.wait(1.0)

    # -- faults ---------------------------------------------------------------------------------
    def _hook_lines(self, text: str) -> list[int]:
        return [
            self.cluster.worker_log(i).read_text(errors="replace").count(text)
            if self.cluster.worker_log(i).exists()
            else 0
            for i in range(self.cluster.n_workers)
        ]

    def _kill_held_worker(self, delay_file: Path, hook: str, trigger: Callable[[], None]) -> str:
        before = self._hook_lines(hook)
        delay_file.write_text("60")
        try:
            trigger()
            # Behind a backlog the task may start late: wait as long as a settle.
            deadline = time.monotonic() + self.cfg.settle_timeout_s
            while time.monotonic() < deadline:
                now = self._hook_lines(hook)
                held = [i for i, (a, b) in enumerate(zip(before, now, strict=True)) if b > a]
                if held:
                    break
                time.sleep(0.1)
            else:
                return f"{NOT_INJECTED}: no task started in {self.cfg.settle_timeout_s:.0f} s"
        finally:
            delay_file.unlink(missing_ok=True)
        index = held[0]
        self.cluster.kill_worker(index)
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.cluster.start_worker(index)
        return f"worker {index} killed while {hook.split()[2]} was running"

    def _restart_redis(self, during: Callable[[], None] | None = None) -> str:
        self.cluster.redis.kill()
        if during is not None:
            during()
        time.sleep(self.rng.uniform(2.0, 4.0))
        self.cluster.redis.start()
        return "redis killed and restarted"

    def _restart(self, name: str) -> str:
        self.cluster.kill_service(name)
        time.sleep(self.rng.uniform(0.2, 1.5))
        started = time.monotonic()
        getattr(self.cluster, f"start_{name}")()
        return f"{name} killed and restarted (up again after {time.monotonic() - started:.1f} s)"

    def inject(self, kind: str) -> str:
        cluster = self.cluster
        if kind == "worker_mid_task":
            return self._kill_held_worker(
                cluster.delay_file, "test hook: index_image sleeps", self._one_more_upload
            )
        if kind == "worker_random":
            index = self.rng.randrange(cluster.n_workers)
            cluster.kill_worker(index)
            time.sleep(self.rng.uniform(0.5, 2.0))
            cluster.start_worker(index)
            return f"worker {index} killed"
        if kind == "worker_mid_training":
            with self.gateway() as client:
                return self._kill_held_worker(
                    cluster.train_delay_file,
                    "test hook: train_model sleeps",
                    lambda: self.killed_trainings.append(self.train(client)),
                )
        if kind == "redis":
            return self._restart_redis()
        if kind in ("search", "gateway"):
            return self._restart(kind)
        if kind == "store":
            import signal

            cluster.s3.gateway.stop_daemon("rgw", sig=signal.SIGKILL)
            time.sleep(self.rng.uniform(2.0, 4.0))
            cluster.s3.gateway.start_daemon("rgw")
            return "radosgw killed and restarted"
        if kind == "search_while_redis_down":

            def search_restart() -> None:
                time.sleep(0.5)
                cluster.kill_service("search")
                # Started while Redis is down: it catches up from the store and serves; Redis
                # comes back once it answers (an outage longer than a start-up is the fault).
                cluster.start_search()

            return self._restart_redis(during=search_restart) + ", search restarted meanwhile"
        raise ValueError(f"unknown fault {kind!r}")

    def _fault_thread(self, kinds: list[str]) -> None:
        try:
            for kind in kinds:
                time.sleep(self.rng.uniform(*self.cfg.fault_gap_s))
                started = time.time()
                try:
                    what = self.inject(kind)
                except Exception as exc:  # the report says so; the loop goes on
                    what = f"{NOT_INJECTED}: {type(exc).__name__}: {exc}"
                self.last_fault_end = time.time()
                self.faults.append(
                    {"kind": kind, "at": started, "s": self.last_fault_end - started, "what": what}
                )
        finally:
            self.faults_done.set()

    def plan(self) -> list[str]:
        kinds = list(self.cfg.fault_kinds)
        plan = [kinds[i % len(kinds)] for i in range(self.cfg.faults)]  # each kind, then more
        self.rng.shuffle(plan)
        return plan

    # -- the loop -------------------------------------------------------------------------------
    def plant_debris(self, count: int = 2) -> None:
        """What a gateway killed between two writes of an upload without a key leaves: an
        image folder with a cipher and no meta.json (the janitor must remove it)."""
        from pecbir_contracts.layout import new_image_id

        store = self.cluster.s3.open()
        rng = np.random.default_rng(self.cfg.seed)
        for _ in range(count):
            image_id = new_image_id()
            cipher, _, _ = _image(rng, self.cfg.image_size)
            store.put(self.layout.cipher(image_id), cipher, "image/png")
            self.planted_debris.append(image_id)

    def run(self) -> dict:
        started = time.time()
        self.plant_debris()
        self.seed()
        seeded = time.time()
        stop_watch = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(stop_watch,), daemon=True)
        watcher.start()
        faults = threading.Thread(target=self._fault_thread, args=(self.plan(),), daemon=True)
        faults.start()
        n = self.cfg.upload_threads
        threads = [
            threading.Thread(target=self._uploader, args=(i, n), daemon=True) for i in range(n)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        faults.join()
        quiet_from = time.time()
        all_searchable = self.wait_searchable(self.cfg.settle_timeout_s)
        stop_watch.set()
        watcher.join(5)
        # The janitor's grace period and two sweeps after the last write.
        time.sleep(self.cfg.debris_grace_s + 2 * self.cfg.janitor_interval_s)
        return self.report(started, seeded, quiet_from, all_searchable)

    def _breakdown(self, store: Any, acked: list[_Upload]) -> dict:
        from pecbir_platform.store import list_modified

        first_record: dict[str, float] = {}
        prefix = self.layout.root + "features/"
        for key, modified in list_modified(store, prefix).items():
            image_id = key.rsplit("/", 1)[-1].removesuffix(".npz")
            first_record[image_id] = min(modified, first_record.get(image_id, modified))
        to_record, to_searchable = [], []
        for upload in acked:
            written = first_record.get(upload.image_id)
            if written is None or upload.acked_at is None:
                continue
            to_record.append(max(0.0, written - upload.acked_at))
            if upload.searchable_at is not None:
                to_searchable.append(max(0.0, upload.searchable_at - written))
        return {
            "ack_to_first_record": _stats(to_record),
            "first_record_to_searchable": _stats(to_searchable),
        }

    def report(self, started: float, seeded: float, quiet_from: float, settled: bool) -> dict:
        store = self.cluster.s3.open()
        keys = store.list(self.layout.images_prefix)
        images: dict[str, set[str]] = {}
        for key in keys:
            image_id, _, name = key[len(self.layout.images_prefix) :].partition("/")
            images.setdefault(image_id, set()).add(name)
        complete = {i for i, names in images.items() if "meta.json" in names}
        debris = sorted(i for i in images if i not in complete)
        acked = [u for u in self.uploads if u.image_id]
        acked_ids = {u.image_id for u in acked}
        # One logical upload stored as two images: a key answered with two ids, or
        # complete images nobody was told about beyond the unkeyed uploads that failed.
        two_ids = sum(1 for u in self.uploads if len(u.ids_answered) > 1)
        unkeyed_failed = sum(1 for u in self.uploads if u.key is None and not u.image_id)
        unacknowledged = sorted(complete - acked_ids)
        lost = [u.image_id for u in acked if u.searchable_at is None]
        delays = [u.searchable_at - u.acked_at for u in acked if u.searchable_at]
        searchable_times = [u.searchable_at for u in acked if u.searchable_at]
        health = {}
        for name, url in (
            ("gateway", self.cluster.gateway_url),
            ("search", self.cluster.search_url),
        ):
            try:
                health[name] = httpx.get(url + "/readyz", timeout=10).status_code == 200
            except httpx.HTTPError:
                health[name] = False
        for index, proc in self.cluster.workers.items():
            health[f"worker-{index}"] = proc.poll() is None
        statuses: Counter = Counter()
        for upload in self.uploads:
            statuses.update(upload.statuses)
        last_fault_end = self.last_fault_end or quiet_from
        trained = [v for v in self.killed_trainings if store.exists(self.layout.manifest(v))]
        breakdown = self._breakdown(store, acked)
        loads = [load for _, load in self.load_samples]
        return {
            "collection": self.collection,
            "planted_debris": len(self.planted_debris),
            "trainings_killed": self.killed_trainings,
            "trainings_killed_then_completed": trained,
            "seed": self.cfg.seed,
            "uploads": len(self.uploads) - self.cfg.seed_uploads,  # with the faults' own
            "acknowledged": len(acked_ids),
            "lost": len(lost),
            "lost_ids": lost[:20],
            "duplicated": two_ids + max(0, len(unacknowledged) - unkeyed_failed),
            "unacknowledged_complete_images": len(unacknowledged),
            "unkeyed_failed": unkeyed_failed,
            "debris": len(debris),
            "debris_ids": debris[:20],
            "faults": self.faults,
            "n_faults": sum(not f["what"].startswith(NOT_INJECTED) for f in self.faults),
            # Per acknowledged upload: (acknowledged, searchable) in seconds from the loop's
            # start (searchable None: never), and the faults' starts on the same clock.
            "timeline": {
                "uploads": [
                    [
                        round(u.acked_at - started, 2),
                        round(u.searchable_at - started, 2) if u.searchable_at else None,
                    ]
                    for u in acked
                ],
                "faults": [round(f["at"] - started, 2) for f in self.faults],
            },
            "ack_to_searchable_s": {
                "n": len(delays),
                "p50": percentile(delays, 50) if delays else None,
                "p99": percentile(delays, 99) if delays else None,
                "max": max(delays) if delays else None,
            },
            # Where the time went: acknowledged → its first feature record written (queue wait
            # and the index task), that record → searchable (event, search service, the 1 s
            # poll, or the wait for a swap when the first record was of a version not served).
            "breakdown_s": breakdown,
            "load_1m": {
                "min": min(loads) if loads else None,
                "mean": sum(loads) / len(loads) if loads else None,
                "max": max(loads) if loads else None,
            },
            "last_fault_to_all_searchable_s": (
                max(0.0, max(searchable_times) - last_fault_end)
                if settled and searchable_times
                else None
            ),
            "all_searchable": settled,
            "healthy": health,
            "answers": dict(statuses),
            "attempts_per_upload_max": max((u.attempts for u in self.uploads), default=0),
            "seed_and_train_s": seeded - started,
            "duration_s": time.time() - started,
        }


def _stats(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50": percentile(values, 50) if values else None,
        "p99": percentile(values, 99) if values else None,
        "max": max(values) if values else None,
    }


def run_loop(cluster: Any, cfg: RecoveryConfig, collection: str) -> dict:
    """One seeded fault loop on a fresh collection of a running cluster (module docstring).

    Parameters
    ----------
    cluster
        A started `procs.Cluster` with `recovery_env`, own Redis, an S3 bucket on a radosgw
        this process manages, and `delay_file` / `train_delay_file` attributes (the paths
        given to `recovery_env`).
    cfg
        Sizes, seed and bounds.
    collection
        A collection name not used before in this cluster.

    Returns
    -------
    dict
        The loop's report (acknowledged, lost, duplicated, debris, latencies, faults, health).
    """
    return _Loop(cluster, cfg, collection).run()


def checks(report: dict) -> dict[str, dict]:
    """Pass/fail of one loop's report: nothing lost, duplicated or left over, all healthy.

    Parameters
    ----------
    report
        What `run_loop` returned.

    Returns
    -------
    dict
        Check name → {"ok": bool, "detail": str}.
    """
    return {
        "nothing_lost": {
            "ok": report["lost"] == 0 and report["all_searchable"],
            "detail": f"{report['lost']} of {report['acknowledged']} acknowledged not searchable",
        },
        "no_duplicates": {
            "ok": report["duplicated"] == 0,
            "detail": f"{report['duplicated']} duplicated",
        },
        "killed_trainings_completed": {
            "ok": report["trainings_killed"] == report["trainings_killed_then_completed"],
            "detail": f"{len(report['trainings_killed_then_completed'])} of "
            f"{len(report['trainings_killed'])} trainings killed mid-way completed later",
        },
        "no_debris": {
            "ok": report["debris"] == 0,
            "detail": f"{report['debris']} incomplete images left after the janitor",
        },
        "all_healthy": {
            "ok": all(report["healthy"].values()),
            "detail": ", ".join(
                f"{name}={'up' if up else 'DOWN'}" for name, up in report["healthy"].items()
            ),
        },
    }


def summary(reports: list[dict]) -> dict:
    """Totals over loops (the measurement the issue asks for).

    Parameters
    ----------
    reports
        What `run_loop` returned, one per loop.

    Returns
    -------
    dict
        Sums of acknowledged, lost, duplicated, debris and faults; the latencies.
    """
    delays_max = [r["ack_to_searchable_s"]["max"] for r in reports if r["ack_to_searchable_s"]["n"]]
    return {
        "loops": len(reports),
        "acknowledged": sum(r["acknowledged"] for r in reports),
        "lost": sum(r["lost"] for r in reports),
        "duplicated": sum(r["duplicated"] for r in reports),
        "debris": sum(r["debris"] for r in reports),
        "faults": sum(r["n_faults"] for r in reports),
        "p50_ack_to_searchable_s_per_loop": [r["ack_to_searchable_s"]["p50"] for r in reports],
        "p99_ack_to_searchable_s_per_loop": [r["ack_to_searchable_s"]["p99"] for r in reports],
        "max_ack_to_searchable_s": max(delays_max) if delays_max else None,
        "max_ack_to_first_record_s": max(
            (r["breakdown_s"]["ack_to_first_record"]["max"] or 0.0 for r in reports), default=None
        ),
        "max_first_record_to_searchable_s": max(
            (r["breakdown_s"]["first_record_to_searchable"]["max"] or 0.0 for r in reports),
            default=None,
        ),
        "load_1m_range": [
            min(
                (r["load_1m"]["min"] for r in reports if r["load_1m"]["min"] is not None),
                default=None,
            ),
            max(
                (r["load_1m"]["max"] for r in reports if r["load_1m"]["max"] is not None),
                default=None,
            ),
        ],
        # None when a loop never got all-searchable (its own entry says so).
        "worst_last_fault_to_all_searchable_s": None
        if not reports or any(r["last_fault_to_all_searchable_s"] is None for r in reports)
        else max(r["last_fault_to_all_searchable_s"] for r in reports),
    }


def as_dict(cfg: RecoveryConfig) -> dict:
    """The configuration as JSON-able values.

    Parameters
    ----------
    cfg
        A loop's configuration.

    Returns
    -------
    dict
        Its fields.
    """
    return asdict(cfg)
