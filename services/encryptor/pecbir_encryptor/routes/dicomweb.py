"""DICOMweb STOW-RS: images with their DICOM SEG tumour masks in one multipart request."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pecbir_contracts.routes import (
    ENCRYPTOR_PLAIN_IMAGE,
    ENCRYPTOR_STOW_STUDIES,
    ENCRYPTOR_STOW_STUDY,
)
from pecbir_encryptor.core import Encryptor
from pecbir_encryptor.deps import Caller, Ctx, collection_name
from pecbir_encryptor.dicom import (
    StowError,
    parse_multipart_related,
    read_instance,
    stow_response,
)
from pecbir_encryptor.dicom_ingest import store_instances
from pecbir_platform.web import read_body_limited

DICOM_JSON = "application/dicom+json"

router = APIRouter(tags=["dicomweb"])


def stow(
    encryptor: Encryptor,
    *,
    collection: str,
    request_body: bytes,
    content_type: str,
    label: int | None,
    role: str,
    base_url: str,
    max_pixels: int,
) -> Response:
    """Store what a STOW request holds; the PS3.18 answer (blocking: run it in a thread).

    Each part's declared image size is checked against `max_pixels` before anything is
    inflated, decoded or encrypted (the limit of the single-image path).
    """
    try:
        parts = parse_multipart_related(content_type, request_body)
    except StowError as exc:
        status = 415 if "Content-Type" in str(exc) or "type=" in str(exc) else 400
        raise HTTPException(status, str(exc)) from None
    instances = [
        read_instance(body, headers.get("content-type", ""), max_pixels=max_pixels)
        for headers, body in parts
    ]

    def retrieve_url(image_id: str) -> str:
        path = ENCRYPTOR_PLAIN_IMAGE.format(collection=collection, image_id=image_id)
        return f"{base_url}{path}"

    stored, failed = store_instances(
        encryptor,
        instances,
        collection=collection,
        label=label,
        role=role,
        retrieve_url=retrieve_url,
        max_pixels=max_pixels,
    )
    status, body = stow_response(stored, failed)
    encryptor.audit.write(
        action="stow", collection=collection, stored=len(stored), failed=len(failed)
    )
    return JSONResponse(status_code=status, content=body, media_type=DICOM_JSON)


# The body is read raw (multipart/related is no form FastAPI parses), so it is documented here.
STOW_BODY = {
    "requestBody": {
        "required": True,
        "description": "DICOM Part 10 instances, one per part: MR images and the DICOM SEG "
        "objects of their tumour masks (a SEG names its image through ReferencedSeriesSequence "
        "or SourceImageSequence). At most PECBIR_ENCRYPTOR_MAX_UPLOAD_BYTES in all.",
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    }
}


@router.post(ENCRYPTOR_STOW_STUDIES, openapi_extra=STOW_BODY)
async def stow_rs(
    collection: str,
    request: Request,
    claims: Caller,
    ctx: Ctx,
    label: Annotated[int | None, Query(ge=0, le=255)] = None,
    role: Annotated[str, Query(pattern="^(template|query)$")] = "template",
) -> Response:
    """DICOMweb STOW-RS: images with their DICOM SEG tumour masks in one request."""
    ctx.permit(claims, "upload")
    collection = collection_name(collection)
    # Refused by its Content-Length, or at the first byte over the limit: never held whole.
    body = await read_body_limited(request, limit=ctx.settings.max_upload_bytes)
    return await run_in_threadpool(
        stow,
        ctx.encryptor,
        collection=collection,
        request_body=body,
        content_type=request.headers.get("content-type", ""),
        label=label,
        role=role,
        base_url=str(request.base_url).rstrip("/"),
        max_pixels=ctx.settings.max_pixels,
    )


@router.post(ENCRYPTOR_STOW_STUDY, openapi_extra=STOW_BODY)
async def stow_rs_study(
    collection: str,
    study: str,
    request: Request,
    claims: Caller,
    ctx: Ctx,
    label: Annotated[int | None, Query(ge=0, le=255)] = None,
    role: Annotated[str, Query(pattern="^(template|query)$")] = "template",
) -> Response:
    """DICOMweb STOW-RS into one study (the study UID in the path is not checked against the
    instances: as /studies)."""
    return await stow_rs(collection, request, claims, ctx, label, role)
