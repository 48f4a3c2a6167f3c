"""Search with a plain query image, and bit-exact decryption of the hits for key holders."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import Response

from pecbir_contracts.auth import Claims
from pecbir_contracts.layout import check_image_id
from pecbir_contracts.png import encode_png
from pecbir_contracts.routes import ENCRYPTOR_PLAIN_IMAGE, ENCRYPTOR_SEARCH
from pecbir_contracts.schemas import MAX_K
from pecbir_encryptor.core import Opened
from pecbir_encryptor.deps import Caller, Ctx, EncryptorContext, collection_name, gateway_failed
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_encryptor.inputs import read_mask, read_pixels
from pecbir_encryptor.integrity import IntegrityError
from pecbir_platform.web import read_limited
from pecore.cipher import to_uint8

router = APIRouter(tags=["search"])


@router.post(ENCRYPTOR_SEARCH)
def search(
    collection: str,
    claims: Caller,
    ctx: Ctx,
    image: Annotated[UploadFile, File(description="plain query image: DICOM, PNG or NPY")],
    mask: Annotated[UploadFile, File(description="its tumour mask: PNG, NPY or DICOM SEG")],
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    owner: Annotated[str | None, Query()] = None,
) -> dict[str, object]:
    """Search with a plain query image. A pe collection: the query is encrypted here under a key
    derived from its content (the same query, the same cipher and the same hits); a sealed one:
    its Fisher vector is computed here. The hits come back with links to their decrypted images.
    Scope `search`."""
    ctx.permit(claims, "search")
    collection = collection_name(collection)
    limit = ctx.settings.max_upload_bytes
    try:
        image_bytes = read_limited(image, limit=limit, what="image", refuse_empty=False)
        pixels, _ = read_pixels(image_bytes, "image", max_pixels=ctx.settings.max_pixels)
        mask_bytes = read_limited(mask, limit=limit, what="mask", refuse_empty=False)
        plain_mask, _ = read_mask(mask_bytes, max_pixels=ctx.settings.max_pixels)
        result = ctx.encryptor.search(collection, pixels, plain_mask, k, owner)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    except GatewayError as exc:
        raise gateway_failed(exc) from None
    body = result.model_dump(mode="json")
    for hit in body["hits"]:
        hit["plain_url"] = ENCRYPTOR_PLAIN_IMAGE.format(
            collection=collection, image_id=hit["image_id"]
        )
    return body


def open_audited(ctx: EncryptorContext, claims: Claims, collection: str, image_id: str) -> Opened:
    """A stored image of this owner, fetched, verified and decrypted; every decision audited
    (refused for scope, budget, a bad name, the gateway's refusal or failure, a record whose
    tag does not verify; or done). Scope `decrypt`; HTTPException otherwise.

    Parameters
    ----------
    ctx, claims
        The service's context and the caller.
    collection, image_id
        Which image.
    """
    audit = ctx.encryptor.audit
    record = {"action": "decrypt", "sub": claims.sub, "image_id": image_id[:64]}
    try:
        ctx.permit(claims, "decrypt")
        collection = collection_name(collection)
        check_image_id(image_id)
        opened = ctx.encryptor.fetch_plain(collection, image_id)
    except HTTPException as exc:
        outcome = "denied" if exc.status_code == 403 else "refused"
        audit.write(**record, outcome=outcome, reason=str(exc.detail)[:200])
        raise
    except IntegrityError as exc:
        audit.write(**record, outcome="refused", reason=str(exc))
        raise HTTPException(502, str(exc)) from None
    except GatewayError as exc:
        audit.write(**record, outcome="refused", reason=f"gateway {exc.status}: {exc.detail}"[:200])
        raise gateway_failed(exc) from None
    except ValueError as exc:
        audit.write(**record, outcome="refused", reason=str(exc)[:200])
        raise HTTPException(422, str(exc)) from None
    audit.write(**record, outcome="ok")
    return opened


@router.get(
    ENCRYPTOR_PLAIN_IMAGE,
    responses={200: {"content": {"image/png": {}, "application/octet-stream": {}}}},
)
def plain_image(
    collection: str,
    image_id: str,
    claims: Caller,
    ctx: Ctx,
    format: Annotated[str, Query(pattern="^(png|npy)$")] = "png",
) -> Response:
    """Fetch a cipher image from the cloud, verify the owner's tag, decrypt bit-exactly.

    Every decision is audited: refused (scope, budget, a bad name, the gateway's refusal or
    failure, a record whose tag does not verify) or done.
    """
    opened = open_audited(ctx, claims, collection, image_id)
    plain = opened.image
    headers = {"X-Opaque-Id": opened.record.opaque_id}
    if opened.label is not None:
        # A sealed image's label is known here only, after decryption.
        headers["X-Pecbir-Label"] = str(opened.label)
    if format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, plain, allow_pickle=False)
        return Response(buffer.getvalue(), media_type="application/octet-stream", headers=headers)
    # A sealed image comes back at its own depth: its PNG shows the 8-bit version (npy: exact).
    shown = plain if plain.dtype == np.uint8 else to_uint8(plain)[0]
    return Response(encode_png(shown), media_type="image/png", headers=headers)
