"""The indexer's work, free of Celery: index one image, train a version, plan a re-index.

Every step is idempotent: re-running it after a crash or a redelivery finds what was already
written and continues from there.

A sealed collection (its owner published a patch model) holds no image the cloud can read:
its Fisher vectors come from the owner, and training fits only the metric (CFML) on the
training templates' vectors and labels, over the owner's PCA and GMM.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import redis
from prometheus_client import Counter as MetricCounter
from pydantic import ValidationError

from pecbir_contracts.events import IndexFailedEvent, ModelEvent, RetireEvent, VectorEvent
from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.png import InvalidImage, check_pair, decode_image_png, decode_mask_png
from pecbir_contracts.records import (
    FeatureRecord,
    live_versions,
    read_retired,
    read_version_failures,
    write_current_version,
    write_failure,
)
from pecbir_contracts.schemas import (
    ImageMetadata,
    ModelManifest,
    ReindexPlan,
    SealedImageMetadata,
    TrainRequest,
    parse_stored_record,
)
from pecbir_contracts.store import ObjectNotFound, StorageError
from pecbir_contracts.vectors import InvalidVector, decode_vector_npy
from pecbir_indexer.runtime import Runtime

log = logging.getLogger(__name__)

VERSION_FAILURES = MetricCounter(
    "pecbir_index_version_failures",
    "Images whose indexing with one model version gave up (recorded in the store; that "
    "version is served without them)",
)


class PoisonMessage(Exception):
    """Retrying cannot help (bad stored object, unknown image): dead-letter it."""


@dataclass(frozen=True)
class IndexOutcome:
    image_id: str
    state: str  # "indexed" | "already_indexed" | "awaiting_model" | "retired"
    version: str | None  # the newest version it was indexed with
    versions: tuple[str, ...] = ()  # every version it was indexed with, oldest first
    # Versions after the serving one that failed (version, reason): see `version_failed`.
    failed: tuple[tuple[str, str], ...] = ()


def is_transient(exc: BaseException) -> bool:
    """The store or Redis unreachable: not the image's fault, so retried as a whole task and
    never counted as a failed attempt of the image."""
    return isinstance(exc, (StorageError, redis.RedisError, OSError))


def describe_error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, PoisonMessage) else f"{type(exc).__name__}: {exc}"


def version_failed(
    rt: Runtime, tenant: str, collection: str, version: str, image_id: str, reason: str
) -> bool:
    """Count a failed attempt at indexing `image_id` with `version`; after
    `version_attempts` of them, give up on that pair: True (recorded, see
    `record_version_failure`), else False (the caller queues the image again).

    Without a bound, an image that fails only under a new version (its patches, its mask, a
    numerical corner of the new model) kept that version from ever being served: the search
    service swaps only once the new version holds every image the serving one holds. The
    count lives in Redis beside the tasks' delivery counters, so it survives the worker.
    """
    layout = CollectionLayout(tenant, collection)
    attempts = rt.bus.incr_attempts(f"version:{layout.root}{version}/{image_id}")
    if attempts < rt.settings.version_attempts:
        log.warning(
            "indexing %s of %s with %s failed (attempt %d of %d): %s",
            image_id,
            layout.root,
            version,
            attempts,
            rt.settings.version_attempts,
            reason,
        )
        return False
    record_version_failure(rt, layout, version, image_id, f"{reason} ({attempts} attempts)")
    return True


def record_version_failure(
    rt: Runtime, layout: CollectionLayout, version: str, image_id: str, reason: str
) -> None:
    """Record that `image_id` cannot be indexed with `version` and tell the search services,
    which then swap to `version` without it (the upload status says so)."""
    write_failure(rt.store, layout.version_failure(version, image_id), reason, version=version)
    rt.bus.publish(
        IndexFailedEvent(
            tenant=layout.tenant, collection=layout.collection, version=version, image_id=image_id
        )
    )
    VERSION_FAILURES.inc()
    log.error(
        "gave up indexing %s of %s with %s: %s; %s is served without it",
        image_id,
        layout.root,
        version,
        reason,
        version,
    )


def list_images(rt: Runtime, layout: CollectionLayout) -> list[str]:
    """Ids of the complete images of a collection (meta.json written) that the owner has not
    retired, in key order: what a re-index indexes and a training fits."""
    retired = read_retired(rt.store, layout)
    ids = (layout.image_id_of_meta(key) for key in rt.store.list(layout.images_prefix))
    return [image_id for image_id in ids if image_id and image_id not in retired]


def is_retired(rt: Runtime, layout: CollectionLayout, image_id: str) -> bool:
    return rt.store.exists(layout.retired(image_id))


def retire_image(rt: Runtime, tenant: str, collection: str, image_id: str) -> bool:
    """Tell the search services that the owner retired `image_id` (its marker is written by
    the gateway before this task is queued); False if no marker is there (nothing to say).
    Publishing again on a redelivery is harmless: dropping an absent vector is a no-op."""
    layout = CollectionLayout(tenant, collection)
    if not is_retired(rt, layout, image_id):
        return False
    rt.bus.publish(RetireEvent(tenant=tenant, collection=collection, image_id=image_id))
    return True


def load_record(
    rt: Runtime, layout: CollectionLayout, image_id: str
) -> ImageMetadata | SealedImageMetadata:
    """The stored record of an image, either mode; PoisonMessage if missing or unusable."""
    try:
        return parse_stored_record(rt.store.get(layout.meta(image_id)))
    except ObjectNotFound as exc:
        raise PoisonMessage(f"image {image_id} is missing from the store ({exc})") from None
    except ValidationError as exc:
        raise PoisonMessage(f"image {image_id} is unusable: {exc}") from None


def load_fisher_vector(
    rt: Runtime, layout: CollectionLayout, image_id: str, meta: SealedImageMetadata
) -> np.ndarray:
    """The owner-sent Fisher vector of a sealed image; PoisonMessage if unusable."""
    try:
        vector = decode_vector_npy(rt.store.get(layout.fisher_vector(image_id)))
    except ObjectNotFound as exc:
        raise PoisonMessage(f"image {image_id} is missing from the store ({exc})") from None
    except InvalidVector as exc:
        raise PoisonMessage(f"image {image_id} is unusable: {exc}") from None
    if vector.shape[0] != meta.feature_dim:
        raise PoisonMessage(f"image {image_id}: Fisher vector length differs from its record")
    return vector


def load_image(rt: Runtime, layout: CollectionLayout, image_id: str):
    """(metadata, cipher u8 2-D, mask bool 2-D) of a stored image; PoisonMessage if unusable."""
    meta = load_record(rt, layout, image_id)
    if isinstance(meta, SealedImageMetadata):
        raise PoisonMessage(f"image {image_id} is sealed: the cloud holds no pixels of it")
    try:
        cipher = decode_image_png(rt.store.get(layout.cipher(image_id)), "stored cipher")
        mask = decode_mask_png(rt.store.get(layout.mask(image_id)), "stored mask")
        check_pair(cipher, mask)
    except ObjectNotFound as exc:
        raise PoisonMessage(f"image {image_id} is missing from the store ({exc})") from None
    except (ValidationError, InvalidImage) as exc:
        raise PoisonMessage(f"image {image_id} is unusable: {exc}") from None
    return meta, cipher, mask


def index_image(
    rt: Runtime, tenant: str, collection: str, image_id: str, version: str | None = None
) -> IndexOutcome:
    """Index one image with `version`, or (None: an upload) with every live version.

    An upload is indexed with each version a search service may serve now
    (`records.live_versions`): while a new version is trained or re-indexed, that is the
    serving one too, so the image is searchable within the redelivery bound instead of at
    the swap, and the new version holds it when it takes over. The serving version's record
    is written first (it is the one queries see); if it fails, the task fails. A newer
    version that fails (other than for the store or Redis, `is_transient`) is reported in
    `IndexOutcome.failed` instead: the image is searchable now, and the caller counts the
    attempt (`version_failed`).
    """
    layout = CollectionLayout(tenant, collection)
    versions = [version] if version else live_versions(rt.store, layout)
    if not versions:
        return IndexOutcome(image_id, "awaiting_model", None)
    if is_retired(rt, layout, image_id):
        # A vector published now would only be dropped again by the search services.
        return IndexOutcome(image_id, "retired", versions[-1])
    loaded: dict[str, object] = {}
    states, done, failed = [], [], []
    for position, v in enumerate(versions):
        try:
            states.append(_index_one(rt, layout, image_id, v, loaded))
            done.append(v)
        except Exception as exc:
            if position == 0 or is_transient(exc):
                raise
            failed.append((v, describe_error(exc)))
    state = "indexed" if "indexed" in states else "already_indexed"
    return IndexOutcome(image_id, state, done[-1], tuple(done), tuple(failed))


def _index_one(
    rt: Runtime, layout: CollectionLayout, image_id: str, version: str, loaded: dict[str, object]
) -> str:
    """Write (unless there) and publish the image's record of `version`; "indexed" or
    "already_indexed". `loaded` keeps the stored image between versions of one call."""
    key = layout.features(version, image_id)
    try:
        record = FeatureRecord.from_bytes(rt.store.get(key))
        state = "already_indexed"
    except ObjectNotFound:
        if "meta" not in loaded:
            loaded["meta"] = load_record(rt, layout, image_id)
        meta = loaded["meta"]
        pipeline = rt.model(layout, version)
        try:
            if isinstance(meta, SealedImageMetadata):
                if "fisher" not in loaded:
                    loaded["fisher"] = load_fisher_vector(rt, layout, image_id, meta)[None, :]
                fisher = loaded["fisher"]
            else:
                if "pixels" not in loaded:
                    loaded["pixels"] = load_image(rt, layout, image_id)[1:]
                cipher, mask = loaded["pixels"]
                fisher = pipeline.fisher_vectors([cipher], [mask])
            vector = pipeline.project(fisher)[0]
        except ValueError as exc:
            raise PoisonMessage(f"feature extraction failed for {image_id}: {exc}") from None
        record = FeatureRecord(version, vector, meta.label)
        rt.store.put(key, record.to_bytes())
        state = "indexed"
    # Publishing again on a redelivery is harmless: the search service upserts by image id.
    rt.bus.publish(
        VectorEvent(
            tenant=layout.tenant,
            collection=layout.collection,
            version=version,
            image_id=image_id,
            label=record.label,
            vector=[float(v) for v in record.vector],
        )
    )
    return state


def train_model(rt: Runtime, tenant: str, collection: str, version: str) -> ModelManifest:
    """Fit PCA+GMM+CFML on the labelled templates; store the artifact; make it current."""
    layout = CollectionLayout(tenant, collection)
    try:
        manifest = ModelManifest.model_validate_json(rt.store.get(layout.manifest(version)))
        log.info("model %s already trained; publishing again", version)
    except ObjectNotFound:
        manifest = _fit_version(rt, layout, version)
    write_current_version(rt.store, layout, version)
    rt.bus.publish(ModelEvent(tenant=tenant, collection=collection, version=version))
    return manifest


def _fit_version(rt: Runtime, layout: CollectionLayout, version: str) -> ModelManifest:
    from pecore.pipeline import CBIRPipeline

    try:
        params = TrainRequest.model_validate_json(rt.store.get(layout.train_request(version)))
    except ObjectNotFound:
        raise PoisonMessage(f"no training request for {version}") from None
    try:
        patch_model = rt.store.get(layout.patch_model)
    except ObjectNotFound:
        patch_model = None
    if patch_model is not None:
        return _fit_sealed_version(rt, layout, version, params, patch_model)
    params = _pe_roi_params(rt, layout, params)
    templates = []
    image_ids = list_images(rt, layout)
    # Several reads at once: a training reads every image of the collection (three objects
    # each), one after the other it spent most of its time waiting for the store.
    with ThreadPoolExecutor(max(1, rt.settings.batch_io_threads)) as pool:
        loaded = pool.map(lambda image_id: load_image(rt, layout, image_id), image_ids)
        for image_id, (meta, cipher, mask) in zip(image_ids, loaded, strict=True):
            if meta.role == "template" and meta.label is not None:
                templates.append((meta.opaque_id, image_id, cipher, mask, meta.label))
    # In the owner's pseudonym order, not the image ids' (random for unbound uploads): the
    # patch sample, and so the model, is then the same for the same images, whatever their ids.
    templates.sort(key=lambda template: template[:2])
    images = [cipher for _, _, cipher, _, _ in templates]
    masks = [mask for _, _, _, mask, _ in templates]
    labels = [label for *_, label in templates]
    counts = _check_counts(labels)
    started = time.perf_counter()
    pipeline = CBIRPipeline(**params.model_dump(), **rt.pipeline_options())
    pipeline.fit(images, masks, np.asarray(labels))
    seconds = time.perf_counter() - started
    probe = pipeline.fisher_vectors(images[:1], masks[:1])
    return _store_version(rt, layout, version, params, pipeline, probe, counts, seconds)


def _pe_roi_params(rt: Runtime, layout: CollectionLayout, params: TrainRequest) -> TrainRequest:
    """A pe-roi collection's training parameters: its masks are the ROI already.

    The owner dilated the tumour mask and moved the ROI with the tiles; dilating it again
    here would read blank pixels and neighbouring tiles, so the radius is 0 (the manifest
    records it).  The owner kept a margin of ⌊P/2⌋ pixels for its patch size; larger patches
    would read blank pixels at the ROI's border.  The scheme fixes the patch size its cloud
    mask was cut for (`RoiCipher.patch_size`): a request at the default patch size trains
    with the scheme's, a smaller one is kept, a wider one refused.
    """
    try:
        marker = json.loads(rt.store.get(layout.pe_roi))
    except ObjectNotFound:
        return params
    from pecore.cipher_roi import RoiCipher

    scheme = RoiCipher.from_name(marker["scheme"])
    if scheme.reflect:
        # the tile-reflected patches are an experiment-only option (pecbir experiment)
        raise PoisonMessage(
            f"collection {layout.collection}: {scheme.legacy_name}'s tile-reflected patches "
            "are not supported by the indexer"
        )
    patch = params.patch_size
    if patch == TrainRequest.model_fields["patch_size"].default:
        patch = scheme.patch_size
    try:
        scheme.check_patch_size(patch)
    except ValueError as exc:
        raise PoisonMessage(f"collection {layout.collection}: {exc}") from None
    return params.model_copy(update={"radius": 0, "patch_size": patch})


def _check_counts(labels: list[int]) -> Counter:
    counts = Counter(labels)
    if len(counts) < 2 or min(counts.values()) < 2:
        raise PoisonMessage(
            "training needs at least two labelled templates in each of two classes; "
            f"found {dict(counts)}"
        )
    return counts


def _fit_sealed_version(
    rt: Runtime, layout: CollectionLayout, version: str, params: TrainRequest, patch_model: bytes
) -> ModelManifest:
    """CFML on the owner-sent Fisher vectors of the training templates, over its patch model.

    The patch model's own parameters (K, R, P, radius, PCA) rule; of the training request
    only the metric's (`metric_lambda`, `dim`) apply.
    """
    from pecore.owner_features import PatchModelFeaturizer

    try:
        featurizer = PatchModelFeaturizer.from_bytes(patch_model)
    except ValueError as exc:
        raise PoisonMessage(f"the collection's patch model is unusable: {exc}") from None
    digest = hashlib.sha256(patch_model).hexdigest()
    templates = []
    for image_id in list_images(rt, layout):
        meta = load_record(rt, layout, image_id)
        if not isinstance(meta, SealedImageMetadata) or meta.patch_model != digest:
            continue  # features of another model cannot share one metric space
        if meta.role == "template" and meta.label is not None:
            templates.append((meta.opaque_id, image_id, meta))
    templates.sort(key=lambda template: template[:2])  # the owner's order, as above
    vectors = [load_fisher_vector(rt, layout, image_id, meta) for _, image_id, meta in templates]
    labels = [meta.label for *_, meta in templates]
    counts = _check_counts(labels)
    started = time.perf_counter()
    pipeline = featurizer.pipeline(metric_lambda=params.metric_lambda, dim=params.dim)
    pipeline.n_jobs = rt.settings.encode_threads
    try:
        pipeline.fit_metric(np.stack(vectors), np.asarray(labels))
    except ValueError as exc:
        raise PoisonMessage(f"training failed: {exc}") from None
    seconds = time.perf_counter() - started
    return _store_version(
        rt, layout, version, params, pipeline, vectors[0][None, :], counts, seconds
    )


def _store_version(
    rt: Runtime,
    layout: CollectionLayout,
    version: str,
    params: TrainRequest,
    pipeline,  # pecore.pipeline.CBIRPipeline
    probe: np.ndarray,
    counts: Counter,
    seconds: float,
) -> ModelManifest:
    buffer = io.BytesIO()
    pipeline.save(buffer)
    rt.store.put(layout.model(version), buffer.getvalue())
    manifest = ModelManifest(
        version=version,
        tenant=layout.tenant,
        collection=layout.collection,
        created_at=time.time(),
        params=params,
        n_templates=sum(counts.values()),
        label_counts={str(k): v for k, v in sorted(counts.items())},
        feature_dim=int(probe.shape[1]),
        projected_dim=int(pipeline.project(probe).shape[1]),
        train_seconds=round(seconds, 3),
        feature_backend=rt.feature_backend(),
    )
    # The manifest marks the version as complete.
    rt.store.put(layout.manifest(version), manifest.model_dump_json().encode())
    return manifest


def reindex_plan(
    rt: Runtime, tenant: str, collection: str, version: str, size: int | None = None
) -> list[list[str]]:
    """Chunks of `size` (default: the reindex_chunk setting) image ids still lacking features
    for `version`. Records the plan (`ReindexPlan`: the collection's total, for progress and
    ETA) unless one exists: a redelivered fan-out keeps the first plan's start and total."""
    layout = CollectionLayout(tenant, collection)
    done = {
        layout.image_id_of_features(version, key)
        for key in rt.store.list(layout.features_prefix(version))
    }
    images = list_images(rt, layout)
    # An image given up on under this version (`version_failed`) is not tried again.
    failed = read_version_failures(rt.store, layout, version)
    todo = [image_id for image_id in images if image_id not in done and image_id not in failed]
    size = max(1, size or rt.settings.reindex_chunk)
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    plan = ReindexPlan(
        version=version, total=len(images), batches=len(chunks), started_at=time.time()
    )
    rt.store.put_if_absent(layout.reindex_plan(version), plan.model_dump_json().encode())
    return chunks


def describe(value: object) -> str:
    return json.dumps(value, default=str)[:500]
