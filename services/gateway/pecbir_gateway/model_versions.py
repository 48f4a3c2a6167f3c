"""Model versions: start training, report what is indexed and served."""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated

import httpx
from fastapi import APIRouter, Body, HTTPException
from fastapi.responses import JSONResponse

from pecbir_contracts.layout import CollectionLayout, version_name, version_number
from pecbir_contracts.routes import (
    GATEWAY_MODEL,
    GATEWAY_MODEL_TRAIN,
    GATEWAY_MODEL_VERSION,
    SEARCH_STATUS,
)
from pecbir_contracts.schemas import (
    ModelManifest,
    ModelStatus,
    ReindexPlan,
    ReindexProgress,
    TrainAccepted,
    TrainRequest,
)
from pecbir_contracts.store import ObjectNotFound
from pecbir_contracts.tasks import TASK_TRAIN_MODEL
from pecbir_gateway.deps import Caller, Ctx, GatewayContext, Owner, authorise
from pecbir_gateway.dispatch import DispatchError
from pecbir_gateway.images import current_version

log = logging.getLogger(__name__)
router = APIRouter(tags=["models"])


def _versions(ctx: GatewayContext, layout: CollectionLayout) -> list[str]:
    found = {layout.version_of_model_key(key) for key in ctx.store.list(layout.models_prefix)}
    return sorted((v for v in found if v), key=version_number)


@router.post(GATEWAY_MODEL_TRAIN, status_code=202, response_model=TrainAccepted)
def train(
    collection: str,
    claims: Caller,
    ctx: Ctx,
    params: Annotated[TrainRequest | None, Body()] = None,
) -> JSONResponse:
    """Queue the training of a new model version on the collection's cipher templates; answers the
    version number it will have. Scope `train`."""
    access = authorise(ctx, claims, collection, None, "train")
    params = params or TrainRequest()
    layout = access.layout
    body = params.model_dump_json().encode()
    versions = _versions(ctx, layout)
    number = version_number(versions[-1]) + 1 if versions else 1
    while not ctx.store.put_if_absent(
        layout.train_request(version_name(number)), body, "application/json"
    ):
        number += 1
    version = version_name(number)
    try:
        ctx.dispatcher.send(TASK_TRAIN_MODEL, [layout.tenant, layout.collection, version])
    except DispatchError as exc:
        ctx.store.delete(layout.train_request(version))
        # The cause names the broker's host: for the log, not for the client.
        log.error("training %s could not be queued: %s", version, exc)
        raise HTTPException(503, "training could not be queued; retry later") from None
    answer = TrainAccepted(
        version=version,
        collection=collection,
        status_url=GATEWAY_MODEL_VERSION.format(collection=collection, version=version),
    )
    return JSONResponse(status_code=202, content=answer.model_dump(mode="json"))


@router.get(GATEWAY_MODEL_VERSION)
def model_version(
    collection: str,
    version: str,
    claims: Caller,
    ctx: Ctx,
) -> dict[str, object]:
    """One model version: its training parameters, state and manifest once trained. Scope `read`."""
    layout = authorise(ctx, claims, collection, None, "read").layout
    try:
        request = TrainRequest.model_validate_json(ctx.store.get(layout.train_request(version)))
    except (ObjectNotFound, ValueError):
        raise HTTPException(404, f"no model version {version!r} in {collection}") from None
    try:
        manifest = ModelManifest.model_validate_json(ctx.store.get(layout.manifest(version)))
        return {"version": version, "state": "trained", "manifest": manifest.model_dump()}
    except ObjectNotFound:
        pass
    state = {"version": version, "state": "queued", "params": request.model_dump()}
    failure_key = layout.model_failure(version)
    if ctx.store.exists(failure_key):
        state.update(state="failed", reason=json.loads(ctx.store.get(failure_key))["reason"])
    return state


@router.get(GATEWAY_MODEL, response_model=ModelStatus)
def model_status(
    collection: str,
    claims: Caller,
    ctx: Ctx,
    owner: Owner = None,
) -> ModelStatus:
    """The collection's model: versions, the one being indexed, the one serving searches and how
    many vectors it holds. Scope `read`."""
    access = authorise(ctx, claims, collection, owner, "read")
    layout = access.layout
    status = ModelStatus(
        collection=collection, owner=access.owner, indexing_version=current_version(ctx, layout)
    )
    try:
        held = ctx.search.get(
            SEARCH_STATUS.format(collection=collection),
            params={"owner": access.owner},
            headers=ctx.search_headers(access),
        )
        if held.status_code == 200:
            index = held.json()
            status.serving_version = index["serving_version"]
            status.n_vectors = index["n_vectors"]
            status.pending_version = index.get("pending_version")
            status.pending_vectors = index.get("pending_vectors", 0)
    except httpx.HTTPError:
        pass
    status.reindex = _reindex_progress(ctx, layout, status)
    return status


def _reindex_progress(
    ctx: GatewayContext, layout: CollectionLayout, status: ModelStatus
) -> ReindexProgress | None:
    """done/total of the version being indexed, and an ETA at the rate since its fan-out."""
    version = status.indexing_version
    if version is None:
        return None
    try:
        plan = ReindexPlan.model_validate_json(ctx.store.get(layout.reindex_plan(version)))
    except ObjectNotFound:
        return None  # not trained yet, or the fan-out has not run
    if status.serving_version == version:
        done = status.n_vectors
    elif status.pending_version == version:
        done = status.pending_vectors
    else:
        done = 0
    done = min(done, plan.total)
    progress = ReindexProgress(
        version=version, done=done, total=plan.total, started_at=plan.started_at
    )
    elapsed = time.time() - plan.started_at
    if done > 0 and elapsed > 0:
        progress.images_per_s = done / elapsed
        progress.eta_seconds = (plan.total - done) / progress.images_per_s
    return progress
