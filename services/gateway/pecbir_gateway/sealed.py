"""Sealed collections: the owner's patch model, sealed uploads, their blobs, vector queries.

The gateway never opens a sealed blob (it holds no key): it checks its framing and size,
stores it opaquely next to the owner-sent Fisher vector, and serves searches with Fisher
vectors the owner computed with the collection's published patch model.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.routes import (
    GATEWAY_IMAGE_SEALED,
    GATEWAY_PATCH_MODEL,
    GATEWAY_SEALED_IMAGES,
    GATEWAY_SEARCH_FISHER,
    SEARCH_SEARCH_FISHER,
)
from pecbir_contracts.schemas import MAX_K, SealedImageMetadata, SearchResponse, UploadAccepted
from pecbir_contracts.store import ObjectNotFound
from pecbir_contracts.vectors import InvalidVector, decode_vector_npy
from pecbir_gateway.deps import Caller, Ctx, GatewayContext, Owner, authorise
from pecbir_gateway.images import (
    SEALED_MAGIC,
    IdempotencyKey,
    accept_upload,
    checked_image,
    is_sealed_collection,
)
from pecbir_gateway.search import forward_search
from pecbir_platform.web import read_limited

router = APIRouter(tags=["sealed"])

_NPZ_MAGIC = b"PK\x03\x04"
# A patch model is PCA + GMM arrays (tens of kB for the paper's sizes).
_MAX_PATCH_MODEL_BYTES = 16 * 1024 * 1024


def patch_model_sha256(ctx: GatewayContext, layout: CollectionLayout) -> str:
    try:
        return hashlib.sha256(ctx.store.get(layout.patch_model)).hexdigest()
    except ObjectNotFound:
        raise HTTPException(
            409, f"collection {layout.collection} is not sealed: publish its patch model first"
        ) from None


@router.put(GATEWAY_PATCH_MODEL, responses={200: {}, 201: {}})
def put_patch_model(
    collection: str,
    claims: Caller,
    ctx: Ctx,
    model: Annotated[UploadFile, File(description="the owner's patch model (npz, no pickle)")],
) -> JSONResponse:
    """Publish a collection's patch model; from then on the collection is sealed (once only)."""
    layout = authorise(ctx, claims, collection, None, "upload").layout
    data = read_limited(model, limit=_MAX_PATCH_MODEL_BYTES, what="model")
    if not data.startswith(_NPZ_MAGIC):
        raise HTTPException(422, "model: not an npz archive")
    digest = hashlib.sha256(data).hexdigest()
    body = {"collection": layout.collection, "patch_model": digest}
    if not is_sealed_collection(ctx, layout) and any(
        layout.image_id_of_meta(key) for key in ctx.store.list(layout.images_prefix)
    ):
        raise HTTPException(409, f"collection {layout.collection} already holds pe images")
    if ctx.store.put_if_absent(layout.patch_model, data, "application/octet-stream"):
        return JSONResponse(status_code=201, content=body)
    if patch_model_sha256(ctx, layout) == digest:
        return JSONResponse(status_code=200, content=body)
    raise HTTPException(
        409, f"collection {layout.collection} already has another patch model; use a new one"
    )


@router.get(GATEWAY_PATCH_MODEL, responses={200: {"content": {"application/octet-stream": {}}}})
def get_patch_model(collection: str, claims: Caller, ctx: Ctx, owner: Owner = None) -> Response:
    """The collection's published patch model (404: the collection is not sealed)."""
    layout = authorise(ctx, claims, collection, owner, "read").layout
    try:
        data = ctx.store.get(layout.patch_model)
    except ObjectNotFound:
        raise HTTPException(404, f"collection {collection} has no patch model") from None
    return Response(data, media_type="application/octet-stream")


@router.post(
    GATEWAY_SEALED_IMAGES,
    status_code=202,
    response_model=UploadAccepted,
    responses={409: {"description": "Not a sealed collection, or another content for this id"}},
)
def upload_sealed(
    collection: str,
    blob: Annotated[UploadFile, File(description="the owner's sealed blob (AES-256-GCM)")],
    fisher_vector: Annotated[UploadFile, File(description="float32 .npy Fisher vector")],
    metadata: Annotated[str, Form(description="SealedImageMetadata as JSON")],
    claims: Caller,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Store one sealed image and its owner-computed Fisher vector; queue its indexing."""
    layout = authorise(ctx, claims, collection, None, "upload").layout
    limit = ctx.settings.max_upload_bytes
    blob_bytes = read_limited(blob, limit=limit, what="blob")
    vector_bytes = read_limited(fisher_vector, limit=limit, what="fisher_vector")
    try:
        meta = SealedImageMetadata.model_validate_json(metadata)
    except ValidationError as exc:
        raise HTTPException(422, f"metadata: {exc.errors(include_url=False)}") from None
    if not blob_bytes.startswith(SEALED_MAGIC):
        raise HTTPException(422, "blob: not a sealed blob")
    try:
        vector = decode_vector_npy(vector_bytes)
    except InvalidVector as exc:
        raise HTTPException(422, str(exc)) from None
    if vector.shape[0] != meta.feature_dim:
        raise HTTPException(
            422, f"fisher_vector has {vector.shape[0]} values, metadata says {meta.feature_dim}"
        )
    if patch_model_sha256(ctx, layout) != meta.patch_model:
        raise HTTPException(
            409, f"the features were computed with another patch model than {collection}'s"
        )
    return accept_upload(
        ctx,
        layout,
        [
            (layout.sealed, blob_bytes, "application/octet-stream"),
            (layout.fisher_vector, vector_bytes, "application/octet-stream"),
        ],
        meta.model_dump_json().encode(),
        idempotency_key=idempotency_key,
        bound_opaque_id=meta.opaque_id,
    )


@router.get(GATEWAY_IMAGE_SEALED, responses={200: {"content": {"application/octet-stream": {}}}})
def download_sealed(
    collection: str, image_id: str, claims: Caller, ctx: Ctx, owner: Owner = None
) -> StreamingResponse:
    """The stored sealed blob of an image (opaque to the cloud)."""
    access = authorise(ctx, claims, collection, owner, "read")
    checked_image(access, ctx, image_id)
    key = access.layout.sealed(image_id)
    if not ctx.store.exists(key):
        raise HTTPException(404, f"image {image_id} is not sealed")
    return StreamingResponse(ctx.store.iter_chunks(key), media_type="application/octet-stream")


def _ciphertext_of(blob: bytes) -> bytes | None:
    """The payload ciphertext of a sealed blob (after its header), None if not framed as one."""
    start = len(SEALED_MAGIC) + 4
    if len(blob) < start or not blob.startswith(SEALED_MAGIC):
        return None
    return blob[start + int.from_bytes(blob[len(SEALED_MAGIC) : start], "big") :]


@router.put(GATEWAY_IMAGE_SEALED, responses={409: {"description": "The payload changed"}})
def rewrap_sealed(
    collection: str,
    image_id: str,
    blob: Annotated[UploadFile, File(description="the same blob, its data key re-wrapped")],
    claims: Caller,
    ctx: Ctx,
) -> dict[str, object]:
    """Replace a sealed blob by its re-wrapped copy (the owner's key rotation).

    Only the header (the wrap of the data key) may change: the payload's ciphertext must be
    byte for byte the stored one, which the cloud checks without any key.
    """
    access = authorise(ctx, claims, collection, None, "upload")
    checked_image(access, ctx, image_id)
    key = access.layout.sealed(image_id)
    try:
        stored = ctx.store.get(key)
    except ObjectNotFound:
        raise HTTPException(404, f"image {image_id} is not sealed") from None
    data = read_limited(blob, limit=ctx.settings.max_upload_bytes, what="blob")
    new_payload = _ciphertext_of(data)
    if new_payload is None:
        raise HTTPException(422, "blob: not a sealed blob")
    if new_payload != _ciphertext_of(stored):
        raise HTTPException(409, "a re-wrap keeps the payload; this blob's payload differs")
    ctx.store.put(key, data, "application/octet-stream")
    return {"image_id": image_id, "collection": collection, "state": "rewrapped"}


@router.post(GATEWAY_SEARCH_FISHER, response_model=SearchResponse)
def search_fisher(
    collection: str,
    fisher_vector: Annotated[UploadFile, File(description="the query's float32 .npy vector")],
    claims: Caller,
    ctx: Ctx,
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    owner: Owner = None,
) -> SearchResponse:
    """k-NN with a Fisher vector the caller computed with the collection's patch model."""
    access = authorise(ctx, claims, collection, owner, "search")
    vector_bytes = read_limited(
        fisher_vector, limit=ctx.settings.max_upload_bytes, what="fisher_vector"
    )
    try:
        decode_vector_npy(vector_bytes)
    except InvalidVector as exc:
        raise HTTPException(422, str(exc)) from None
    if not is_sealed_collection(ctx, access.layout):
        raise HTTPException(409, f"collection {collection} is not sealed: search with an image")
    files = {"fisher_vector": ("query.npy", vector_bytes, "application/octet-stream")}
    path = SEARCH_SEARCH_FISHER.format(collection=collection)
    return forward_search(ctx, access, path, k=k, sealed=True, files=files)
