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
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_PROCESSING,
    StowError,
    parse_multipart_related,
    read_instance,
    stow_response,
)
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_encryptor.stow import Failed, Pairing, Stored, pair_instances, seg_outcomes
from pecbir_platform.web import read_body_limited
from pecore.io import dicom_is_lossy, read_dicom

DICOM_JSON = "application/dicom+json"

router = APIRouter(tags=["dicomweb"])


def _store_pairing(
    encryptor: Encryptor,
    pairing: Pairing,
    *,
    collection: str,
    label: int | None,
    role: str,
    base_url: str,
    max_pixels: int,
) -> str | Failed:
    """Encrypt and upload one paired image: the retrieve URL of its plain image, or why not."""
    instance, uid = pairing.image, pairing.image.sop_instance
    try:
        pixels, dataset = read_dicom(instance.payload, max_pixels=max_pixels)
        opaque_id = encryptor.opaque_id_for(uid)
        answer = encryptor.ingest(
            collection,
            pixels,
            pairing.seg.mask,
            opaque_id=opaque_id,
            label=label if label is not None else pairing.seg.label,
            role=role,
            idempotency_key=f"stow-{collection}-{opaque_id}",
            lossy=dicom_is_lossy(dataset),
        )
    except ValueError as exc:
        return (instance.sop_class, uid, FAILURE_CANNOT_UNDERSTAND, str(exc))
    except GatewayError as exc:
        return (instance.sop_class, uid, FAILURE_PROCESSING, exc.detail)
    path = ENCRYPTOR_PLAIN_IMAGE.format(collection=collection, image_id=answer["image_id"])
    return f"{base_url}{path}"


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
    plan = pair_instances(
        [
            read_instance(body, headers.get("content-type", ""), max_pixels=max_pixels)
            for headers, body in parts
        ]
    )
    stored: list[Stored] = []
    failed: list[Failed] = list(plan.refused)
    used_segs: set[str] = set()
    for item in plan.images:
        if not isinstance(item, Pairing):
            failed.append(item)
            continue
        outcome = _store_pairing(
            encryptor,
            item,
            collection=collection,
            label=label,
            role=role,
            base_url=base_url,
            max_pixels=max_pixels,
        )
        if isinstance(outcome, str):
            stored.append((item.image.sop_class, item.image.sop_instance, outcome))
            used_segs.add(item.seg_instance.sop_instance)
        else:
            failed.append(outcome)
    seg_stored, seg_failed = seg_outcomes(plan.segs, used_segs)
    stored += seg_stored
    failed += seg_failed
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
