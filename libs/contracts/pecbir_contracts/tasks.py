"""Celery task and queue names, and the names of the event streams (one place for all)."""

from __future__ import annotations

__all__ = [
    "ATTEMPTS_KEY_PREFIX",
    "EVENT_STREAM",
    "EVENT_STREAM_MAXLEN",
    "QUEUE_DEAD_LETTER",
    "QUEUE_INDEX",
    "QUEUE_REINDEX",
    "QUEUE_REINDEX_GPU",
    "QUEUE_TRAIN",
    "TASK_DEAD_LETTER",
    "TASK_INDEX_BATCH",
    "TASK_INDEX_CHUNK",
    "TASK_INDEX_IMAGE",
    "TASK_QUEUES",
    "TASK_REINDEX_COLLECTION",
    "TASK_RETIRE_IMAGE",
    "TASK_TRAIN_MODEL",
    "WORKER_QUEUES",
]

# Tasks (their arguments carry ids only: tenant, collection, image id, model version).
TASK_INDEX_IMAGE = "pecbir.index.image"  # (tenant, collection, image_id)
TASK_INDEX_CHUNK = "pecbir.index.chunk"  # (tenant, collection, version, [image_id, ...])
# The same arguments, for the GPU worker: one batched feature computation per message.
TASK_INDEX_BATCH = "pecbir.index.batch"  # (tenant, collection, version, [image_id, ...])
TASK_TRAIN_MODEL = "pecbir.model.train"  # (tenant, collection, version)
TASK_REINDEX_COLLECTION = "pecbir.index.collection"  # (tenant, collection, version)
# Announce a retired image to the search services (the gateway wrote its marker first).
TASK_RETIRE_IMAGE = "pecbir.index.retire"  # (tenant, collection, image_id)
TASK_DEAD_LETTER = "pecbir.dead_letter"  # (original task name, task id, args, reason)

# Queues. Uploads are indexed on their own queue so a re-index never delays fresh uploads.
QUEUE_INDEX = "pecbir.index"
QUEUE_REINDEX = "pecbir.reindex"
QUEUE_TRAIN = "pecbir.train"
# Re-index batches for the GPU workers (issue 17). deploy/k8s gives it to the GPU pool only; a
# worker on every queue (`python -m pecbir_indexer`, the tests) takes it too, on any back end.
QUEUE_REINDEX_GPU = "pecbir.reindex.gpu"
# Nobody consumes this queue: poison messages wait there for an operator.
QUEUE_DEAD_LETTER = "pecbir.dead_letter"

TASK_QUEUES: dict[str, str] = {
    TASK_INDEX_IMAGE: QUEUE_INDEX,
    TASK_RETIRE_IMAGE: QUEUE_INDEX,
    TASK_INDEX_CHUNK: QUEUE_REINDEX,
    TASK_INDEX_BATCH: QUEUE_REINDEX_GPU,
    TASK_REINDEX_COLLECTION: QUEUE_REINDEX,
    TASK_TRAIN_MODEL: QUEUE_TRAIN,
    TASK_DEAD_LETTER: QUEUE_DEAD_LETTER,
}
# Every queue an indexer worker may consume (deploy/k8s splits them over three pools).
WORKER_QUEUES = (QUEUE_INDEX, QUEUE_REINDEX, QUEUE_TRAIN, QUEUE_REINDEX_GPU)

# Redis stream the search service follows (vectors and model announcements).
EVENT_STREAM = "pecbir:events"
EVENT_STREAM_MAXLEN = 200_000
# Delivery counter per task id (poison detection across worker crashes).
ATTEMPTS_KEY_PREFIX = "pecbir:attempts:"
