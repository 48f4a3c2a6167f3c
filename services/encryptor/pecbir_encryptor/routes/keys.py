"""Key release: the key of one stored image, for an authorised image user (always audited)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from pecbir_contracts.layout import check_image_id
from pecbir_contracts.routes import ENCRYPTOR_KEY_RELEASE
from pecbir_encryptor.deps import Caller, Ctx, collection_name, gateway_failed
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_encryptor.integrity import IntegrityError

router = APIRouter(tags=["keys"])


# No docstring: it would become the schema's description and change the OpenAPI document.
class KeyReleaseRequest(BaseModel):
    collection: str  # the collection the image was uploaded to
    image_id: str  # the cloud's image id


@router.post(ENCRYPTOR_KEY_RELEASE)
def release_key(request: KeyReleaseRequest, claims: Caller, ctx: Ctx) -> dict[str, object]:
    """The key of one image, for an authorised image user (audited, allowed or not)."""
    encryptor = ctx.encryptor
    record = {"action": "key-release", "sub": claims.sub, "image_id": request.image_id[:64]}
    try:
        ctx.permit(claims, "key-release")
        collection = collection_name(request.collection)
    except HTTPException as exc:
        # Every decision on a key is audited: no scope (denied), no budget, a bad name.
        outcome = "denied" if exc.status_code == 403 else "refused"
        encryptor.audit.write(**record, outcome=outcome, reason=str(exc.detail)[:200])
        raise
    try:
        check_image_id(request.image_id)
        opaque_id, released = encryptor.release(collection, request.image_id)
    except (IntegrityError, ValueError) as exc:
        encryptor.audit.write(**record, outcome="refused", reason=str(exc))
        raise HTTPException(422, str(exc)) from None
    except GatewayError as exc:
        encryptor.audit.write(**record, outcome="refused", reason=exc.detail)
        raise gateway_failed(exc) from None
    encryptor.audit.write(**record, opaque_id=opaque_id, mode=released["mode"], outcome="released")
    return {"image_id": request.image_id, **released}
