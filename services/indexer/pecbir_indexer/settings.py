"""Indexer settings, from the environment (prefix PECBIR_)."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import SettingsConfigDict

from pecbir_platform.store import StoreSettings


class IndexerSettings(StoreSettings):
    model_config = SettingsConfigDict(env_prefix="PECBIR_", extra="ignore")

    broker_url: str = "redis://127.0.0.1:6379/0"
    # Event stream for the search service; defaults to the broker's Redis.
    events_url: str | None = None
    reindex_chunk: int = 32
    # A re-index chunk gives way between two images when an upload's index task waits (the
    # rest of the chunk is queued again). Uploads wait less, but while the re-index waits
    # every upload is indexed with each live version (issue 15: measured both ways).
    reindex_give_way: bool = True
    # > 0: a re-index fans out batches of this many images to the GPU workers' queue
    # (pecbir.reindex.gpu, task pecbir.index.batch) instead of CPU chunks of `reindex_chunk`.
    reindex_gpu_batch: int = 0
    # Threads reading and writing the store around one batched feature computation.
    batch_io_threads: int = 8
    max_retries: int = 5
    # Deliveries of one task id (retries + redeliveries after a worker died) before it is
    # treated as poison and dead-lettered.
    max_deliveries: int = 8
    model_cache_size: int = 4
    encode_threads: int | None = None
    # Where Fisher vectors and projections are computed (pecore.torch_features, issue 17):
    # "numpy" is the reference; "torch" needs the [gpu] extra and runs on `feature_device`
    # (None: CUDA when present, else the CPU). Training fits PCA/GMM/CFML on the CPU either way.
    feature_backend: Literal["numpy", "torch"] = "numpy"
    feature_device: str | None = None
    # A lost worker's unacknowledged message is handed out again after this many seconds
    # (Redis transport). Keep it above the longest task (training) or a slow task runs twice.
    visibility_timeout_s: int = 3600
    # Recovery (pecbir_indexer.recovery, issue 15). Every running task beats every quarter
    # of `redelivery_bound_s`; every `reconcile_interval_s` one worker of the cluster (a Redis
    # lease) queues again the tasks whose beat is older than the bound (their worker was
    # killed: their message sits unacknowledged until `visibility_timeout_s`). Every
    # `janitor_interval_s` it also lists the store: images waiting longer than the bound and
    # untrained versions are queued again, crash debris (incomplete image folders, temporary
    # files) older than `debris_grace_s` removed. 0 turns the reconciler off.
    reconcile_interval_s: float = 15.0
    redelivery_bound_s: float = 60.0
    janitor_interval_s: float = 600.0
    debris_grace_s: float = 900.0
    # A janitor pass lists at most this many image objects of each collection (and the
    # feature records of the same images), then the next pass resumes after them (a cursor
    # per collection in Redis); a cycle over a collection takes ⌈its image objects / this⌉
    # passes. A full listing of 10⁷ objects took about 18 min on radosgw (issue 15), longer
    # than the interval. 0: the whole collection every pass.
    janitor_page_objects: int = 100_000
    # The janitor's pass rewrites a served version's snapshot (one object holding its feature
    # records, read by the search service at start-up) once this many records are not in it;
    # 0 writes none.
    snapshot_min_records: int = 256
    # An image whose indexing with one version fails this many times (any error but the
    # store's or Redis's being unreachable) is recorded as failed for that version
    # (failures/<version>/<image_id>.json, the upload status, /metrics) and that version is
    # served without it; before, it held the swap to that version back for good.
    version_attempts: int = 3
    # At most this many index tasks re-queued per pass (a slow re-index is not flooded).
    reconcile_max_requeue: int = 1000
    # A training holds a lease renewed every third of this; a killed one loses it this long
    # after, and only then may the reconciler queue the version again: never two at once.
    train_lease_s: float = 30.0
    # Fault-injection hook for tests only: while this file exists, `index_image` first sleeps
    # as many seconds as it holds (makes "kill the worker mid-task" deterministic).
    test_index_delay_file: str | None = None
    # The same for `train_model` (a kill mid-training).
    test_train_delay_file: str | None = None
    # The same for each image of an `index_chunk` (a re-index in progress when an upload comes).
    test_chunk_delay_file: str | None = None
