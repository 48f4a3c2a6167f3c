"""The indexer's work, free of Celery: index one image, train a version, plan a re-index.

Every step is idempotent: re-running it after a crash or a redelivery finds what was already
written and continues from there.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from pecbir_contracts.events import ModelEvent, VectorEvent
from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.png import InvalidImage, check_pair, decode_image_png, decode_mask_png
from pecbir_contracts.records import FeatureRecord, read_current_version, write_current_version
from pecbir_contracts.schemas import ImageMetadata, ModelManifest, TrainRequest
from pecbir_contracts.store import ObjectNotFound
from pecbir_indexer.runtime import Runtime

log = logging.getLogger(__name__)


class PoisonMessage(Exception):
    """Retrying cannot help (bad stored object, unknown image): dead-letter it."""


@dataclass(frozen=True)
class IndexOutcome:
    image_id: str
    state: str  # "indexed" | "already_indexed" | "awaiting_model"
    version: str | None


def list_images(rt: Runtime, layout: CollectionLayout) -> list[str]:
    """Ids of the complete images of a collection (meta.json written), in key order."""
    ids = (layout.image_id_of_meta(key) for key in rt.store.list(layout.images_prefix))
    return [image_id for image_id in ids if image_id]


def load_image(rt: Runtime, layout: CollectionLayout, image_id: str):
    """(metadata, cipher u8 2-D, mask bool 2-D) of a stored image; PoisonMessage if unusable."""
    try:
        meta = ImageMetadata.model_validate_json(rt.store.get(layout.meta(image_id)))
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
    layout = CollectionLayout(tenant, collection)
    version = version or read_current_version(rt.store, layout)
    if version is None:
        return IndexOutcome(image_id, "awaiting_model", None)
    key = layout.features(version, image_id)
    try:
        record = FeatureRecord.from_bytes(rt.store.get(key), with_fisher_vector=False)
        state = "already_indexed"
    except ObjectNotFound:
        meta, cipher, mask = load_image(rt, layout, image_id)
        pipeline = rt.model(layout, version)
        try:
            fisher = pipeline.fisher_vectors([cipher], [mask])
            vector = pipeline.project(fisher)[0]
        except ValueError as exc:
            raise PoisonMessage(f"feature extraction failed for {image_id}: {exc}") from None
        record = FeatureRecord(version, fisher[0], vector, meta.label)
        rt.store.put(key, record.to_bytes())
        state = "indexed"
    # Publishing again on a redelivery is harmless: the search service upserts by image id.
    rt.bus.publish(
        VectorEvent(
            tenant=tenant,
            collection=collection,
            version=version,
            image_id=image_id,
            label=record.label,
            vector=[float(v) for v in record.vector],
        )
    )
    return IndexOutcome(image_id, state, version)


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
    images, masks, labels = [], [], []
    for image_id in list_images(rt, layout):
        meta, cipher, mask = load_image(rt, layout, image_id)
        if meta.role == "template" and meta.label is not None:
            images.append(cipher)
            masks.append(mask)
            labels.append(meta.label)
    counts = Counter(labels)
    if len(counts) < 2 or min(counts.values()) < 2:
        raise PoisonMessage(
            "training needs at least two labelled templates in each of two classes; "
            f"found {dict(counts)}"
        )
    started = time.perf_counter()
    pipeline = CBIRPipeline(**params.model_dump(), **rt.pipeline_options())
    pipeline.fit(images, masks, np.asarray(labels))
    seconds = time.perf_counter() - started
    buffer = io.BytesIO()
    pipeline.save(buffer)
    rt.store.put(layout.model(version), buffer.getvalue())
    probe = pipeline.fisher_vectors(images[:1], masks[:1])
    manifest = ModelManifest(
        version=version,
        tenant=layout.tenant,
        collection=layout.collection,
        created_at=time.time(),
        params=params,
        n_templates=len(labels),
        label_counts={str(k): v for k, v in sorted(counts.items())},
        feature_dim=int(probe.shape[1]),
        projected_dim=int(pipeline.project(probe).shape[1]),
        train_seconds=round(seconds, 3),
        feature_backend=rt.feature_backend(),
    )
    # The manifest marks the version as complete.
    rt.store.put(layout.manifest(version), manifest.model_dump_json().encode())
    return manifest


def reindex_plan(rt: Runtime, tenant: str, collection: str, version: str) -> list[list[str]]:
    """Chunks of image ids still lacking features for `version`."""
    layout = CollectionLayout(tenant, collection)
    done = {
        layout.image_id_of_features(version, key)
        for key in rt.store.list(layout.features_prefix(version))
    }
    todo = [image_id for image_id in list_images(rt, layout) if image_id not in done]
    size = max(1, rt.settings.reindex_chunk)
    return [todo[i : i + size] for i in range(0, len(todo), size)]


def describe(value: object) -> str:
    return json.dumps(value, default=str)[:500]
