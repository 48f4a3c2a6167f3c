"""A sealed collection's patch model: fitted here on the owner's plain images, then published."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile

from pecbir_contracts.routes import ENCRYPTOR_PATCH_MODEL
from pecbir_encryptor.deps import Caller, Ctx, collection_name, gateway_failed
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_encryptor.inputs import read_mask, read_pixels
from pecbir_platform.web import read_limited

router = APIRouter(tags=["sealed"])


@router.post(ENCRYPTOR_PATCH_MODEL, status_code=201)
def publish_patch_model(
    collection: str,
    claims: Caller,
    ctx: Ctx,
    images: Annotated[list[UploadFile], File(description="plain images: DICOM, PNG or NPY")],
    masks: Annotated[list[UploadFile], File(description="their tumour masks, in the same order")],
    n_components: Annotated[int, Form(ge=2, le=256)] = 64,
    n_regions: Annotated[int, Form(ge=1, le=16)] = 8,
    patch_size: Annotated[int, Form(ge=3, le=15)] = 9,
    radius: Annotated[int, Form(ge=0, le=64)] = 24,
) -> dict[str, object]:
    """Fit the collection's PCA + GMM on plain images, keep it here and publish it (sealed)."""
    ctx.permit(claims, "upload")
    collection = collection_name(collection)
    if len(images) != len(masks):
        raise HTTPException(422, f"{len(images)} images but {len(masks)} masks")
    limit = ctx.settings.max_upload_bytes
    try:
        most = ctx.settings.max_pixels
        pixels = [
            read_pixels(read_limited(f, limit=limit, what="image"), max_pixels=most)[0]
            for f in images
        ]
        plain_masks = [
            read_mask(read_limited(f, limit=limit, what="mask"), max_pixels=most)[0] for f in masks
        ]
        digest = ctx.encryptor.publish_patch_model(
            collection,
            pixels,
            plain_masks,
            n_components=n_components,
            n_regions=n_regions,
            patch_size=patch_size,
            radius=radius,
        )
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    except GatewayError as exc:
        raise gateway_failed(exc) from None
    ctx.encryptor.audit.write(
        action="patch-model", sub=claims.sub, collection=collection, outcome="published"
    )
    return {"collection": collection, "patch_model": digest, "n_images": len(pixels)}
