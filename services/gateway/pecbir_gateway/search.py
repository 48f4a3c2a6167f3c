"""Search: validate the cipher query, forward it to the search service, link the hits."""

from __future__ import annotations

import logging
from typing import Annotated

import httpx
import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, UploadFile

from pecbir_contracts.routes import (
    GATEWAY_IMAGE_CIPHER,
    GATEWAY_IMAGE_SEALED,
    GATEWAY_SEARCH,
    GATEWAY_SEARCH_STORED,
    SEARCH_SEARCH,
    SEARCH_SEARCH_STORED,
)
from pecbir_contracts.schemas import MAX_K, SearchResponse
from pecbir_gateway.deps import Access, Caller, Ctx, GatewayContext, Owner, authorise
from pecbir_gateway.images import checked_image, is_sealed_collection, validate_pair
from pecbir_platform.web import read_limited

log = logging.getLogger(__name__)
router = APIRouter(tags=["search"])


def _check_query_roi(ctx: GatewayContext, mask: np.ndarray) -> None:
    """413 for a query whose tumour ROI is larger than the query limit."""
    roi = int(np.count_nonzero(mask))
    if roi > ctx.settings.max_query_roi_pixels:
        raise HTTPException(
            413,
            f"query tumour mask of {roi} pixels exceeds the query limit of "
            f"{ctx.settings.max_query_roi_pixels} pixels",
        )


def forward_search(
    ctx: GatewayContext,
    access: Access,
    path: str,
    *,
    k: int,
    sealed: bool,
    files: dict[str, tuple[str, bytes, str]] | None = None,
) -> SearchResponse:
    """Ask the search service (`path`: one of its search routes) and return its answer, each
    hit linked to its encrypted download (the sealed blob or the cipher image); its errors
    become the gateway's."""
    try:
        answer = ctx.search.post(
            path,
            params={"owner": access.owner, "k": k},
            files=files,
            headers=ctx.search_headers(access),
        )
    except httpx.HTTPError as exc:
        # The cause names internal hosts and ports: for the log, not for the client.
        log.error("search service unreachable: %s", exc)
        raise HTTPException(503, "search service unavailable") from None
    if answer.status_code != 200:
        detail = answer.json().get("detail") if answer.content else answer.reason_phrase
        status = answer.status_code if answer.status_code in (404, 409, 422) else 502
        raise HTTPException(status, f"search service: {detail}")
    result = SearchResponse.model_validate_json(answer.content)
    template = GATEWAY_IMAGE_SEALED if sealed else GATEWAY_IMAGE_CIPHER
    for hit in result.hits:
        link = template.format(collection=access.layout.collection, image_id=hit.image_id)
        hit.cipher_url = f"{link}?owner={access.owner}"
    return result


@router.post(GATEWAY_SEARCH, response_model=SearchResponse)
def search(
    collection: str,
    cipher: Annotated[UploadFile, File(description="cipher query image, 8-bit grey PNG")],
    mask: Annotated[UploadFile, File(description="tumour mask of the query, binary PNG")],
    claims: Caller,
    ctx: Ctx,
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    owner: Owner = None,
) -> SearchResponse:
    """k nearest stored images to a cipher query image and its mask (the cloud never sees a plain
    image). Scope `search`."""
    access = authorise(ctx, claims, collection, owner, "search")
    limit = ctx.settings.max_upload_bytes
    cipher_bytes = read_limited(cipher, limit=limit, what="cipher")
    mask_bytes = read_limited(mask, limit=limit, what="mask")
    # A query costs at most a bounded multiple of a normal one: its size is refused from the
    # PNG header, its tumour ROI once decoded, before the search service featurises it.
    _, plain_mask = validate_pair(ctx, cipher_bytes, mask_bytes, ctx.settings.max_query_pixels)
    _check_query_roi(ctx, plain_mask)
    if is_sealed_collection(ctx, access.layout):
        raise HTTPException(409, f"collection {collection} is sealed: search with a Fisher vector")
    files = {
        "cipher": ("query.png", cipher_bytes, "image/png"),
        "mask": ("mask.png", mask_bytes, "image/png"),
    }
    path = SEARCH_SEARCH.format(collection=collection)
    return forward_search(ctx, access, path, k=k, sealed=False, files=files)


@router.post(
    GATEWAY_SEARCH_STORED,
    response_model=SearchResponse,
    responses={
        404: {"description": "No such image in the caller's own collection"},
        409: {"description": "The image is not indexed in the serving model version yet"},
    },
)
def search_stored(
    collection: str,
    image_id: str,
    claims: Caller,
    ctx: Ctx,
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
) -> SearchResponse:
    """k nearest stored images to one of the caller's own stored images, by reference: the
    owner's query that is pixel-identical to an image it stored sends no new cipher (or vector);
    the search ranks with the vector the cloud already holds. Only in the caller's own
    collection (no `owner`). Scope `search`."""
    access = authorise(ctx, claims, collection, None, "search")
    checked_image(access, ctx, image_id)
    path = SEARCH_SEARCH_STORED.format(collection=collection, image_id=image_id)
    sealed = is_sealed_collection(ctx, access.layout)
    return forward_search(ctx, access, path, k=k, sealed=sealed)
