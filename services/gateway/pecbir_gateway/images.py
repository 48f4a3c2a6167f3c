"""Uploads, upload status and encrypted-image download."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Header, HTTPException, Query, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from pecbir_contracts.layout import (
    CollectionLayout,
    check_image_id,
    idempotency_record_key,
    image_id_for,
    new_image_id,
)
from pecbir_contracts.png import (
    ImageTooLarge,
    InvalidImage,
    check_pair,
    decode_image_png,
    decode_mask_png,
    encode_png,
)
from pecbir_contracts.records import read_current_version
from pecbir_contracts.routes import (
    GATEWAY_BLOB,
    GATEWAY_IMAGE,
    GATEWAY_IMAGE_CIPHER,
    GATEWAY_IMAGE_MASK,
    GATEWAY_IMAGE_STATUS,
    GATEWAY_IMAGES,
    SEARCH_IMAGE,
)
from pecbir_contracts.schemas import (
    ImageMetadata,
    SealedImageMetadata,
    UploadAccepted,
    UploadStatus,
    is_pe_roi_scheme,
    parse_stored_record,
)
from pecbir_contracts.store import ObjectNotFound, UnsupportedStore
from pecbir_contracts.tasks import TASK_INDEX_IMAGE, TASK_RETIRE_IMAGE
from pecbir_gateway.deps import (
    Access,
    Caller,
    Ctx,
    GatewayContext,
    Owner,
    authorise,
)
from pecbir_gateway.dispatch import DispatchError
from pecbir_platform.store import list_modified
from pecbir_platform.web import read_limited

log = logging.getLogger(__name__)
router = APIRouter(tags=["images"])

# The framing every sealed blob starts with (pecore.sealing.SEALED_MAGIC; the gateway reaches no
# pecore code): of a sealed blob, sealed or pe-roi, the gateway checks nothing else.
SEALED_MAGIC = b"PECBSLD1"

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=8,
        max_length=200,
        description="Same key + same body → the original answer; same key + other body → 409",
    ),
]


def validate_pair(
    ctx: GatewayContext, cipher: bytes, mask: bytes, max_pixels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The decoded cipher image and mask of an upload or query; 413/422 when not acceptable.

    Images over `max_pixels` (default: the upload limit) are refused from their PNG header,
    before any pixel is decompressed.
    """
    max_pixels = max_pixels or ctx.settings.max_pixels
    try:
        image = decode_image_png(cipher, "cipher", max_pixels)
        plain_mask = decode_mask_png(mask, "mask", max_pixels)
        check_pair(image, plain_mask)
    except ImageTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except InvalidImage as exc:
        raise HTTPException(422, str(exc)) from None
    return image, plain_mask


def _status_url(layout: CollectionLayout, image_id: str) -> str:
    path = GATEWAY_IMAGE_STATUS.format(collection=layout.collection, image_id=image_id)
    return f"{path}?owner={layout.tenant}"


def _image_access(collection: str, claims: Caller, ctx: Ctx, owner: Owner = None) -> Access:
    return authorise(ctx, claims, collection, owner, "read")


ImageAccess = Annotated[Access, Depends(_image_access)]
Presign = Annotated[bool, Query(description="answer with a time-limited URL instead")]


@router.post(
    GATEWAY_IMAGES,
    status_code=202,
    response_model=UploadAccepted,
    responses={
        409: {
            "description": "Idempotency key reused with another body, or a record of another "
            "protection mode than the collection's (pe, pe-roi, sealed)"
        }
    },
)
def upload_image(
    collection: str,
    cipher: Annotated[UploadFile, File(description="cipher image, 8-bit grey PNG")],
    mask: Annotated[UploadFile, File(description="tumour mask, binary PNG of the same size")],
    metadata: Annotated[str, Form(description="ImageMetadata as JSON")],
    claims: Caller,
    ctx: Ctx,
    idempotency_key: IdempotencyKey = None,
    blob: Annotated[
        UploadFile | None,
        File(description="pe-roi records only: the image itself, sealed (AES-256-GCM blob)"),
    ] = None,
) -> JSONResponse:
    """Store one protected image: cipher PNG, mask PNG and the owner's metadata record, then queue
    its indexing. With an `Idempotency-Key`, a replay of the same body answers the first
    upload's id and another body under the same key gets 409. A pe-roi record (key scheme
    `pe-roi-t<b>[d|dn][-in]`) sends the ROI-only cipher and the scrambled ROI as image and mask,
    and the image itself as a sealed `blob`; the first one makes the collection pe-roi.
    Scope `upload`."""
    access = authorise(ctx, claims, collection, None, "upload")
    layout = access.layout
    limit = ctx.settings.max_upload_bytes
    cipher_bytes = read_limited(cipher, limit=limit, what="cipher")
    mask_bytes = read_limited(mask, limit=limit, what="mask")
    blob_bytes = read_limited(blob, limit=limit, what="blob") if blob is not None else None
    try:
        meta = ImageMetadata.model_validate_json(metadata)
    except ValidationError as exc:
        raise HTTPException(422, f"metadata: {exc.errors(include_url=False)}") from None
    roi_scheme = _check_pe_roi_parts(meta, blob_bytes)
    image, plain_mask = validate_pair(ctx, cipher_bytes, mask_bytes)
    height, width = image.shape
    if (meta.height, meta.width) != (height, width):
        raise HTTPException(
            422, f"metadata says {meta.height}x{meta.width}, the cipher image is {height}x{width}"
        )
    # What is stored is re-encoded from the decoded pixels, never the uploader's bytes: no
    # ancillary chunks (a tEXt with a patient name), nothing after IEND, one canonical IDAT.
    cipher_bytes, mask_bytes = encode_png(image), encode_png(plain_mask)
    if is_sealed_collection(ctx, layout):
        raise HTTPException(
            409, f"collection {layout.collection} is sealed: upload sealed images to it"
        )
    claim_pe_roi(ctx, layout, roi_scheme)
    bound = meta.integrity is not None and meta.integrity.version >= 3
    parts: list[UploadPart] = [
        (layout.cipher, cipher_bytes, "image/png"),
        (layout.mask, mask_bytes, "image/png"),
    ]
    if blob_bytes is not None:
        parts.append((layout.sealed, blob_bytes, "application/octet-stream"))
    return accept_upload(
        ctx,
        layout,
        parts,
        meta.model_dump_json().encode(),
        idempotency_key=idempotency_key,
        bound_opaque_id=meta.opaque_id if bound else None,
    )


# An object of an upload: (its key as a function of the image id, bytes, content type).
UploadPart = tuple[Callable[[str], str], bytes, str]


def is_sealed_collection(ctx: GatewayContext, layout: CollectionLayout) -> bool:
    """A collection is sealed once its owner published a patch model to it."""
    return ctx.store.exists(layout.patch_model)


def _check_pe_roi_parts(meta: ImageMetadata, blob: bytes | None) -> str | None:
    """The record's pe-roi scheme (None for pe); 422 unless the parts fit its mode.

    A pe-roi image reaches the cloud only sealed: its record must come with a sealed blob
    and be bound to its identity (v3 tag), like the blob itself; a pe record has no blob.
    """
    scheme = meta.key.scheme
    if not scheme.startswith("pe-roi"):
        if blob is not None:
            raise HTTPException(422, f"blob: a {scheme} record has no sealed blob (pe-roi only)")
        return None
    if not is_pe_roi_scheme(scheme):
        raise HTTPException(
            422,
            f"metadata: name the pe-roi scheme explicitly (pe-roi-t<b>[d|dn][-in]), not {scheme}",
        )
    if blob is None:
        raise HTTPException(422, "blob: a pe-roi image travels sealed; the blob part is missing")
    if not blob.startswith(SEALED_MAGIC):
        raise HTTPException(422, "blob: not a sealed blob")
    if meta.integrity is None or meta.integrity.version < 3:
        raise HTTPException(422, "metadata: a pe-roi record needs a v3 tag (bound to its identity)")
    if meta.key.mode != "per-image":
        raise HTTPException(422, "metadata: pe-roi needs per-image keys")
    return scheme


def pe_roi_scheme(ctx: GatewayContext, layout: CollectionLayout) -> str | None:
    """The pe-roi scheme of a pe-roi collection, None for any other."""
    try:
        return str(json.loads(ctx.store.get(layout.pe_roi))["scheme"])
    except ObjectNotFound:
        return None


def claim_pe_roi(ctx: GatewayContext, layout: CollectionLayout, scheme: str | None) -> None:
    """409 unless a record of `scheme` (None: pe) fits the collection's mode.

    A collection's features share one metric space, so it holds pe images or pe-roi images of
    one scheme, never a mix.  The first pe-roi upload to an empty collection makes it pe-roi.
    """
    held = pe_roi_scheme(ctx, layout)
    name = layout.collection
    if scheme is None:
        if held is not None:
            raise HTTPException(409, f"collection {name} is pe-roi ({held}): upload pe-roi images")
        return
    if held is None:
        if any(layout.image_id_of_meta(key) for key in ctx.store.list(layout.images_prefix)):
            raise HTTPException(
                409, f"collection {name} already holds pe images; pe-roi needs its own collection"
            )
        marker = json.dumps({"scheme": scheme}).encode()
        if ctx.store.put_if_absent(layout.pe_roi, marker, "application/json"):
            return
        held = pe_roi_scheme(ctx, layout)
    if held != scheme:
        raise HTTPException(409, f"collection {name} holds {held} images, this record is {scheme}")


def accept_upload(
    ctx: GatewayContext,
    layout: CollectionLayout,
    parts: Sequence[UploadPart],
    meta_bytes: bytes,
    *,
    idempotency_key: str | None,
    bound_opaque_id: str | None,
) -> JSONResponse:
    """Store a validated upload (its parts, then meta.json) and queue its indexing.

    An identity-bound record (`bound_opaque_id`: a v3 tag or a sealed blob) gets the id
    `image_id_for(tenant, collection, opaque id)`, claimed atomically before anything is
    written: the same content again is answered like the first time, other content under the
    same opaque id is refused (409), never stored over the first.
    """
    fingerprint = _fingerprint(layout, *(data for _, data, _ in parts), meta_bytes)
    if bound_opaque_id is not None:
        image_id = image_id_for(layout.tenant, layout.collection, bound_opaque_id)
        return _accept_bound(ctx, layout, image_id, parts, meta_bytes, fingerprint)
    if idempotency_key:
        record_key = idempotency_record_key(layout.tenant, idempotency_key)
        return _accept_keyed(ctx, layout, record_key, parts, meta_bytes, fingerprint)
    image_id = new_image_id()
    _store_image(ctx, layout, image_id, parts, meta_bytes)
    return _queue_indexing(ctx, layout, image_id, _answer(layout, image_id))


def _answer(layout: CollectionLayout, image_id: str) -> UploadAccepted:
    return UploadAccepted(
        image_id=image_id,
        collection=layout.collection,
        state="stored",
        status_url=_status_url(layout, image_id),
    )


def _accept_keyed(
    ctx: GatewayContext,
    layout: CollectionLayout,
    record_key: str,
    parts: Sequence[UploadPart],
    meta_bytes: bytes,
    fingerprint: str,
) -> JSONResponse:
    """An upload under an Idempotency-Key: the image id is reserved under the key (create-only)
    before any object is written, so a retry after a failure at any point — between two
    writes, before the queueing, after a gateway crash — resumes the same image instead of
    starting another one (issue 15). The record is the original answer from the start."""
    image_id = new_image_id()
    answer = _answer(layout, image_id)
    record = {
        "fingerprint": fingerprint,
        "tenant": layout.tenant,
        "collection": layout.collection,
        "image_id": image_id,
        "answer": answer.model_dump(mode="json"),
    }
    if not ctx.store.put_if_absent(record_key, json.dumps(record).encode(), "application/json"):
        # Reserved before (a replay, a retry after a failure, or a concurrent request).
        record = json.loads(ctx.store.get(record_key))
        if record["fingerprint"] != fingerprint:
            raise HTTPException(
                409, "Idempotency-Key was already used for a different upload; use a new key"
            )
        layout = CollectionLayout(record["tenant"], record["collection"])
        answer = UploadAccepted.model_validate(record["answer"])
        image_id = answer.image_id
        if _is_indexed(ctx, layout, image_id):
            return JSONResponse(status_code=202, content=answer.model_dump(mode="json"))
    # Same body as the reservation: (re)write what an earlier attempt may have left unwritten.
    # Rewriting an object with the same bytes is harmless, also under a concurrent retry.
    if not ctx.store.exists(layout.meta(image_id)):
        _store_image(ctx, layout, image_id, parts, meta_bytes)
    # Re-queue (tasks are idempotent) so that a retry after a broker failure completes.
    return _queue_indexing(ctx, layout, image_id, answer)


def _accept_bound(
    ctx: GatewayContext,
    layout: CollectionLayout,
    image_id: str,
    parts: Sequence[UploadPart],
    meta_bytes: bytes,
    fingerprint: str,
) -> JSONResponse:
    store = ctx.store
    answer = _answer(layout, image_id)
    claim_key = idempotency_record_key(layout.tenant, f"image:{layout.collection}/{image_id}")
    claim = {"fingerprint": fingerprint, "image_id": image_id}
    claimed = store.put_if_absent(claim_key, json.dumps(claim).encode(), "application/json")
    if not claimed and json.loads(store.get(claim_key))["fingerprint"] != fingerprint:
        raise HTTPException(
            409,
            f"image {image_id} was already uploaded to {layout.collection} with other "
            "content; new content needs a new id",
        )
    # Same content as the claim: (re)write what a crash may have left unwritten.
    if not store.exists(layout.meta(image_id)):
        _store_image(ctx, layout, image_id, parts, meta_bytes)
    if _is_indexed(ctx, layout, image_id):
        return JSONResponse(status_code=202, content=answer.model_dump(mode="json"))
    return _queue_indexing(ctx, layout, image_id, answer)


def _fingerprint(layout: CollectionLayout, *parts: bytes) -> str:
    """What an Idempotency-Key is bound to: the target collection and every part."""
    body_hash = hashlib.sha256()
    for part in (layout.root.encode(), *parts):
        body_hash.update(hashlib.sha256(part).digest())
    return body_hash.hexdigest()


def _store_image(
    ctx: GatewayContext,
    layout: CollectionLayout,
    image_id: str,
    parts: Sequence[UploadPart],
    meta: bytes,
) -> None:
    """Write an image's objects, meta.json last: it marks the image as complete for listings."""
    for key_of, data, content_type in parts:
        ctx.store.put(key_of(image_id), data, content_type)
    ctx.store.put(layout.meta(image_id), meta, "application/json")


def _queue_indexing(
    ctx: GatewayContext, layout: CollectionLayout, image_id: str, answer: UploadAccepted
) -> JSONResponse:
    try:
        ctx.dispatcher.send(TASK_INDEX_IMAGE, [layout.tenant, layout.collection, image_id])
    except DispatchError as exc:
        log.error("upload %s stored but not queued: %s", image_id, exc)
        return JSONResponse(
            status_code=503,
            content={
                "detail": "image stored, but indexing could not be queued; "
                "retry with the same Idempotency-Key",
                "image_id": image_id,
            },
            headers={"Retry-After": "5"},
        )
    return JSONResponse(status_code=202, content=answer.model_dump(mode="json"))


def current_version(ctx: GatewayContext, layout: CollectionLayout) -> str | None:
    return read_current_version(ctx.store, layout)


def _is_indexed(ctx: GatewayContext, layout: CollectionLayout, image_id: str) -> bool:
    version = current_version(ctx, layout)
    return version is not None and ctx.store.exists(layout.features(version, image_id))


def checked_image(access: Access, ctx: GatewayContext, image_id: str) -> str:
    try:
        check_image_id(image_id)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    if not ctx.store.exists(access.layout.meta(image_id)):
        raise HTTPException(404, f"no image {image_id} in collection {access.layout.collection}")
    return image_id


@router.get(GATEWAY_IMAGE_STATUS, response_model=UploadStatus)
def upload_status(image_id: str, access: ImageAccess, ctx: Ctx) -> UploadStatus:
    """Where an upload stands: stored, awaiting a model, searchable or failed (with the reason).
    Scope `read`."""
    layout = access.layout
    checked_image(access, ctx, image_id)
    base = {"image_id": image_id, "collection": layout.collection}
    try:
        retired = json.loads(ctx.store.get(layout.retired(image_id)))
        return UploadStatus(**base, state="retired", detail=retired.get("reason"))
    except ObjectNotFound:
        pass
    try:
        failure = json.loads(ctx.store.get(layout.failure(image_id)))
        return UploadStatus(**base, state="failed", detail=failure.get("reason"))
    except ObjectNotFound:
        pass
    version = current_version(ctx, layout)
    if version is None:
        waited = _waiting_s(ctx, layout, image_id, with_model=False)
        return UploadStatus(
            **base,
            state="awaiting_model",
            detail="no model trained yet: indexed once the collection's first model is",
            waiting_s=waited,
        )
    if not ctx.store.exists(layout.features(version, image_id)):
        try:  # the indexer gave up on it under this version (it holds no other's swap back)
            failure = json.loads(ctx.store.get(layout.version_failure(version, image_id)))
            return UploadStatus(
                **base,
                state="failed",
                model_version=version,
                detail=f"indexing with {version} gave up: {failure.get('reason')}; "
                f"{version} is served without this image",
            )
        except ObjectNotFound:
            pass
        waited = _waiting_s(ctx, layout, image_id, with_model=True)
        return UploadStatus(
            **base,
            state="stored",
            model_version=version,
            detail=f"waiting for an indexer worker to index it with {version}; work waiting "
            "longer than the indexer's redelivery bound (a worker lost mid-task) is queued "
            "again by its reconciler",
            waiting_s=waited,
        )
    try:
        held = ctx.search.get(
            SEARCH_IMAGE.format(collection=layout.collection, image_id=image_id),
            params={"owner": layout.tenant},
            headers=ctx.search_headers(access),
        )
        searchable = held.status_code == 200 and held.json().get("version") == version
    except Exception as exc:
        log.warning("search service unreachable for status: %s", exc)
        searchable = False
    return UploadStatus(
        **base, state="searchable" if searchable else "indexed", model_version=version
    )


def _waiting_s(
    ctx: GatewayContext, layout: CollectionLayout, image_id: str, *, with_model: bool
) -> float | None:
    """Seconds since the image was stored, or since its model became current if later."""
    try:
        times = list_modified(ctx.store, layout.image_prefix(image_id))
        since = times.get(layout.meta(image_id))
        if with_model:
            since = max([since or 0.0, *list_modified(ctx.store, layout.current_model).values()])
    except UnsupportedStore:
        return None
    return None if since is None else round(max(0.0, time.time() - since), 1)


class RetireRequest(BaseModel):
    """Why the owner retires an image (kept in its marker and shown by its status)."""

    reason: str = Field(
        default="retired by its owner",
        min_length=1,
        max_length=200,
        description="e.g. 'replaced by <image id>' (a corrected DICOM SEG)",
    )


@router.delete(
    GATEWAY_IMAGE,
    status_code=202,
    response_model=UploadStatus,
    responses={
        403: {"description": "Not the owner: only the owning tenant may retire its images"},
        404: {"description": "No such image in the collection"},
    },
)
def retire_image(
    image_id: str,
    claims: Caller,
    ctx: Ctx,
    collection: str,
    body: RetireRequest | None = None,
    owner: Owner = None,
) -> JSONResponse:
    """Retire one of the caller's own images (a corrected version replaced it): it leaves
    every search index and every later training set; its stored objects are kept (so an
    operator can restore it, and its owner can still open it). Idempotent: retiring it again
    answers the same. The search services drop it once the indexer announces it (queued
    here). Scope `upload`, owner only (a tenant a collection is shared with gets 403)."""
    # Scope upload: never granted on another tenant's collection, shared or not (403).
    access = authorise(ctx, claims, collection, owner, "upload")
    layout = access.layout
    checked_image(access, ctx, image_id)
    reason = (body or RetireRequest()).reason
    marker = {"reason": reason, "at": time.time(), "by": claims.sub}
    # The marker first: training, re-indexing and every search replica's catch-up read it,
    # so the retirement holds even if the announcement below is lost.
    key = layout.retired(image_id)
    if not ctx.store.put_if_absent(key, json.dumps(marker).encode(), "application/json"):
        reason = json.loads(ctx.store.get(key)).get("reason", reason)  # retired before
    answer = UploadStatus(
        image_id=image_id, collection=layout.collection, state="retired", detail=reason
    )
    try:
        ctx.dispatcher.send(TASK_RETIRE_IMAGE, [layout.tenant, layout.collection, image_id])
    except DispatchError as exc:
        log.error("image %s retired but not announced: %s", image_id, exc)
        return JSONResponse(
            status_code=503,
            content={
                "detail": "image retired in the store, but the search services could not be "
                "told; retry the same request",
                "image_id": image_id,
            },
            headers={"Retry-After": "5"},
        )
    return JSONResponse(status_code=202, content=answer.model_dump(mode="json"))


@router.get(GATEWAY_IMAGE, response_model=ImageMetadata | SealedImageMetadata)
def image_metadata(image_id: str, access: ImageAccess, ctx: Ctx) -> object:
    """The owner's metadata record of a stored image (key descriptor, integrity tag, label), as
    stored. Scope `read`."""
    checked_image(access, ctx, image_id)
    stored = ctx.store.get(access.layout.meta(image_id))
    try:
        return parse_stored_record(stored)
    except ValidationError:
        # The owner's record, damaged in the store: hand it over as it is (the owner's tag
        # check refuses it) rather than failing with a 500 that hides what happened.
        log.error("stored metadata of image %s no longer validates", image_id)
        return Response(
            stored, media_type="application/json", headers={"X-Pecbir-Stored-Record": "invalid"}
        )


def _download(
    kind: str, image_id: str, presign: bool, access: Access, ctx: GatewayContext
) -> object:
    checked_image(access, ctx, image_id)
    key = access.layout.cipher(image_id) if kind == "cipher" else access.layout.mask(image_id)
    if not ctx.store.exists(key):
        raise HTTPException(404, f"image {image_id} is sealed: it has no {kind} in the cloud")
    if presign:
        ttl = ctx.settings.presign_ttl_s
        url = ctx.store.presigned_get_url(key, timedelta(seconds=ttl))
        if url is None:
            url = GATEWAY_BLOB.format(token=ctx.sign_blob(key, ttl))
        return JSONResponse({"url": url, "expires_in": ttl})
    return StreamingResponse(ctx.store.iter_chunks(key), media_type="image/png")


@router.get(
    GATEWAY_IMAGE_CIPHER,
    responses={200: {"content": {"image/png": {}}}},
)
def download_cipher(
    image_id: str,
    access: ImageAccess,
    ctx: Ctx,
    presign: Presign = False,
) -> object:
    """The stored cipher image (PNG), or with `presign=true` a short-lived download link. Scope
    `read`."""
    return _download("cipher", image_id, presign, access, ctx)


@router.get(
    GATEWAY_IMAGE_MASK,
    responses={200: {"content": {"image/png": {}}}},
)
def download_mask(
    image_id: str,
    access: ImageAccess,
    ctx: Ctx,
    presign: Presign = False,
) -> object:
    """The stored tumour mask (PNG), or with `presign=true` a short-lived download link. Scope
    `read`."""
    return _download("mask", image_id, presign, access, ctx)


@router.get(GATEWAY_BLOB, responses={200: {"content": {"image/png": {}}}}, tags=["images"])
def download_blob(token: str, ctx: Ctx) -> StreamingResponse:
    """Capability URL made by `?presign=true` on the filesystem store (no bearer token)."""
    key = ctx.open_blob(token)
    try:
        return StreamingResponse(ctx.store.iter_chunks(key), media_type="image/png")
    except ObjectNotFound:
        raise HTTPException(404, "object no longer exists") from None
