"""DICOMweb STOW-RS: images with their DICOM SEG tumour masks in one multipart request."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pecbir_contracts.routes import (
    ENCRYPTOR_STOW_STUDIES,
    ENCRYPTOR_STOW_STUDY,
    ENCRYPTOR_WADO_INSTANCE,
)
from pecbir_contracts.schemas import SealedImageMetadata
from pecbir_encryptor.core import Encryptor
from pecbir_encryptor.deps import Caller, Ctx, collection_name
from pecbir_encryptor.dicom import (
    Instance,
    PartSource,
    StowError,
    multipart_related,
    read_instance,
    retrieved_instance,
    split_multipart_related,
    stow_response,
)
from pecbir_encryptor.dicom_ingest import store_instances
from pecbir_encryptor.routes.search import open_audited
from pecbir_encryptor.stow import Failed, Stored
from pecbir_platform.web import REASON_HEADER, reason_header, spool_body_limited

DICOM_JSON = "application/dicom+json"

router = APIRouter(tags=["dicomweb"])


def stow(
    encryptor: Encryptor,
    *,
    collection: str,
    body: Path,
    content_type: str,
    label: int | None,
    role: str,
    base_url: str,
    max_pixels: int,
) -> Response:
    """Store what a STOW request holds; the PS3.18 answer (blocking: run it in a thread).

    `body` is the spooled request body; each part is read from it when needed, so memory
    grows with the number of instances (their headers), not with the size of the push.
    Each part's declared image size is checked against `max_pixels` before anything is
    inflated, decoded or encrypted (the limit of the single-image path).
    """
    try:
        with open(body, "rb") as stream:
            parts = split_multipart_related(content_type, stream)
    except StowError as exc:
        status = 415 if "Content-Type" in str(exc) or "type=" in str(exc) else 400
        raise HTTPException(status, str(exc)) from None
    instances = []
    for headers, offset, length in parts:
        source = PartSource(body, offset, length)
        instances.append(
            read_instance(
                source.read(),
                headers.get("content-type", ""),
                max_pixels=max_pixels,
                source=source,
            )
        )

    def retrieve_url(instance: Instance, _image_id: str) -> str:
        # WADO-RS, by the UIDs the PACS knows (the encryptor maps them to the cloud's id).
        path = ENCRYPTOR_WADO_INSTANCE.format(
            collection=collection,
            study=str(getattr(instance.dataset, "StudyInstanceUID", "")),
            series=str(getattr(instance.dataset, "SeriesInstanceUID", "")),
            instance=instance.sop_instance,
        )
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
    reason = short_reason(stored, failed)
    # A PACS logs headers and status, rarely a DICOM JSON body: the gist goes in a header too.
    headers = {REASON_HEADER: reason, "Warning": f'299 pecbir "{reason}"'} if reason else None
    return JSONResponse(status_code=status, content=body, media_type=DICOM_JSON, headers=headers)


def short_reason(stored: list[Stored], failed: list[Failed]) -> str | None:
    """One line saying what went wrong (or what to expect) in a STOW answer; None if all is
    well: "2 of 5 instances failed: <first reason>", "1 of 3 stored with a warning: <…>".

    Parameters
    ----------
    stored, failed
        The answer's entries.
    """
    total = len(stored) + len(failed)
    if failed:
        _cls, _uid, code, text = failed[0]
        line = f"{len(failed)} of {total} instances failed (0x{code:04X}): {text}"
    else:
        warned = [entry for entry in stored if entry[3] is not None]
        if not warned:
            return None
        code, text = warned[0][3]
        line = f"{len(warned)} of {total} stored with a warning (0x{code:04X}): {text}"
    return reason_header(line)


# The body is read raw (multipart/related is no form FastAPI parses), so it is documented here.
STOW_BODY = {
    "requestBody": {
        "required": True,
        "description": "DICOM Part 10 instances, one per part: MR images and the DICOM SEG "
        "objects of their tumour masks (a SEG names its image through ReferencedSeriesSequence "
        "or SourceImageSequence), in one request or several, in any order. At most "
        "PECBIR_ENCRYPTOR_MAX_STOW_BYTES in all (default 4 GiB), spooled to disk.",
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
    # Refused by its Content-Length, or at the first byte over the limit; spooled to disk.
    body = await spool_body_limited(
        request, limit=ctx.settings.max_stow_bytes, directory=ctx.settings.spool_dir
    )
    try:
        return await run_in_threadpool(
            stow,
            ctx.encryptor,
            collection=collection,
            body=body,
            content_type=request.headers.get("content-type", ""),
            label=label,
            role=role,
            base_url=(ctx.settings.public_url or str(request.base_url)).rstrip("/"),
            max_pixels=ctx.settings.max_pixels,
        )
    finally:
        body.unlink(missing_ok=True)


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


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@router.get(
    ENCRYPTOR_WADO_INSTANCE,
    responses={200: {"content": {'multipart/related; type="application/dicom"': {}}}},
)
def wado_rs_instance(
    collection: str, study: str, series: str, instance: str, claims: Caller, ctx: Ctx
) -> Response:
    """DICOMweb WADO-RS retrieve of one instance this hospital stored (the RetrieveURL of its
    STOW answer): fetched from the cloud, verified and decrypted here, and sent back as a
    DICOM instance with the UIDs asked for, so that a DICOMweb viewer can open it. A pe
    image comes back at 8 bits (the pe mode's rule); a sealed one exactly as it was sent.
    Only for this tenant's own images (the SOP Instance UID names one through the owner's
    keyed pseudonym). Scope `decrypt`; audited."""
    for name, uid in (("study", study), ("series", series), ("instance", instance)):
        if len(uid) > 64 or not _UID.match(uid):
            raise HTTPException(422, f"{name} UID {uid[:70]!r} is not a DICOM UID")
    # The version served (a corrected SEG makes a new one): the cloud id of the instance.
    image_id = ctx.encryptor.image_id_of(collection_name(collection), instance)
    opened = open_audited(ctx, claims, collection, image_id)
    pe = not isinstance(opened.record, SealedImageMetadata)
    data = retrieved_instance(
        opened.image,
        study=study,
        series=series,
        instance=instance,
        lossy=opened.lossy or pe,
        derivation="pe-cbir pe mode: decrypted at 8 bits per pixel (8-bit rule)" if pe else None,
    )
    body, content_type = multipart_related([data], boundary=f"pecbir-{image_id}")
    # The cloud's id of the image, as search hits name it.
    return Response(body, media_type=content_type, headers={"X-Pecbir-Image-Id": image_id})
