"""Research / PNG / NPY / single-DICOM ingest: one plain image and its mask per request."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile

from pecbir_contracts.layout import check_image_id
from pecbir_contracts.routes import ENCRYPTOR_IMAGE_STATUS, ENCRYPTOR_IMAGES
from pecbir_encryptor.deps import Caller, Ctx, collection_name, gateway_failed
from pecbir_encryptor.dicom_refs import DicomRef
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_encryptor.inputs import read_mask, read_pixels
from pecbir_platform.web import read_limited, require_scope
from pecore.io import open_dicom

router = APIRouter()


@router.post(ENCRYPTOR_IMAGES, status_code=202, tags=["ingest"])
def ingest(
    collection: str,
    claims: Caller,
    ctx: Ctx,
    image: Annotated[UploadFile, File(description="DICOM, PNG or NPY plain image")],
    mask: Annotated[UploadFile, File(description="tumour mask: PNG, NPY or DICOM SEG")],
    label: Annotated[int | None, Form(ge=0, le=255)] = None,
    role: Annotated[str, Form(pattern="^(template|query)$")] = "template",
    train: Annotated[
        bool | None,
        Form(
            description="a training template: only then may the cloud read its label; unset: "
            "the owner's policy (a template only in PECBIR_ENCRYPTOR_TEMPLATE_COLLECTIONS)"
        ),
    ] = None,
) -> dict[str, object]:
    """Encrypt one plain image (DICOM, PNG or NPY) with its tumour mask and upload it to the cloud.
    Everything is checked before anything is sent: a refused file leaves nothing stored.
    Scope `upload`."""
    ctx.permit(claims, "upload")
    collection = collection_name(collection)
    encryptor = ctx.encryptor
    limit = ctx.settings.max_upload_bytes
    try:
        # Empty parts go on to the readers: their message says what is wrong with the file.
        image_bytes = read_limited(image, limit=limit, what="image", refuse_empty=False)
        mask_bytes = read_limited(mask, limit=limit, what="mask", refuse_empty=False)
        pixels, source_uid = read_pixels(image_bytes, "image", max_pixels=ctx.settings.max_pixels)
        plain_mask, seg_label = read_mask(mask_bytes, max_pixels=ctx.settings.max_pixels)
        # DICOM: keyed pseudonym of the SOP Instance UID; files: of their content. Either
        # way a repeated upload maps to the same id and so to the same cloud object.
        content = hashlib.sha256(image_bytes + b"\x00" + mask_bytes).hexdigest()
        opaque_id = encryptor.opaque_id_for(source_uid or f"content:{content}")
        answer = encryptor.ingest(
            collection,
            pixels,
            plain_mask,
            opaque_id=opaque_id,
            label=label if label is not None else seg_label,
            role=role,
            train=train,
            idempotency_key=f"owner-{collection}-{opaque_id}",
        )
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    except GatewayError as exc:
        raise gateway_failed(exc) from None
    if source_uid and encryptor.dicom_refs is not None:
        # Which DICOM instance it is, kept here only (the page's viewer links).
        ref = DicomRef.of(open_dicom(image_bytes, max_pixels=ctx.settings.max_pixels))
        if ref is not None:
            encryptor.dicom_refs.put(collection, str(answer["image_id"]), ref)
    return {"opaque_id": opaque_id, "upload": answer}


@router.get(ENCRYPTOR_IMAGE_STATUS, tags=["ingest"])
def image_status(
    collection: str,
    image_id: str,
    claims: Caller,
    ctx: Ctx,
    owner: Annotated[
        str | None, Query(description="tenant of the image (default: this one)")
    ] = None,
) -> dict[str, object]:
    """Where an upload stands (stored, searchable, failed): the `status_url` of an upload
    answer, asked of the gateway with this tenant's token. Scope `upload` (no budget: a read)."""
    require_scope(claims, "upload")
    collection = collection_name(collection)
    try:
        check_image_id(image_id)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    try:
        return ctx.encryptor.gateway.status(collection, image_id, owner=owner)
    except GatewayError as exc:
        raise gateway_failed(exc) from None
