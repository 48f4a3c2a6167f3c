"""A collection's protection mode, as the cloud holds it: pe, sealed or pe-roi.

A searcher of a collection it does not own learns here what its query must be: an image under
the paper's cipher (pe), a Fisher vector (sealed) or an image through the collection's pe-roi
cipher (pe-roi), so that a query never travels in a weaker form than the collection's images.
The owner's signed record of the mode (`SignedProtection`) is served with it: the searcher's
encryptor checks the signature against the owner's public key and refuses the cloud's word
without it (the cloud cannot forge it; it only stores it).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException

from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.routes import GATEWAY_PROTECTION
from pecbir_contracts.schemas import CollectionProtection, SignedProtection
from pecbir_contracts.store import ObjectNotFound
from pecbir_gateway.deps import Caller, Ctx, GatewayContext, Owner, authorise
from pecbir_gateway.images import is_sealed_collection, pe_roi_scheme
from pecbir_gateway.sealed import patch_model_sha256

router = APIRouter(tags=["images"])


def _held(ctx: GatewayContext, layout: CollectionLayout) -> CollectionProtection:
    if is_sealed_collection(ctx, layout):
        return CollectionProtection(collection=layout.collection, mode="sealed")
    scheme = pe_roi_scheme(ctx, layout)
    mode = "pe" if scheme is None else "pe-roi"
    return CollectionProtection(collection=layout.collection, mode=mode, scheme=scheme)


@router.get(GATEWAY_PROTECTION, response_model=CollectionProtection)
def protection(collection: str, claims: Caller, ctx: Ctx, owner: Owner = None) -> object:
    """The collection's protection mode (pe, sealed or pe-roi with its scheme) and the owner's
    signed record of it; a collection without a patch model or pe-roi image is pe. Scope
    `search`."""
    layout = authorise(ctx, claims, collection, owner, "search").layout
    held = _held(ctx, layout)
    try:
        signed = SignedProtection.model_validate_json(ctx.store.get(layout.signed_protection))
    except ObjectNotFound:
        signed = None
    except ValueError:
        signed = None  # damaged in the store: the peer refuses an unsigned record
    return held.model_copy(update={"signed": signed})


@router.put(
    GATEWAY_PROTECTION,
    response_model=CollectionProtection,
    responses={409: {"description": "The record names another mode than the collection's"}},
)
def put_protection(
    collection: str, signed: SignedProtection, claims: Caller, ctx: Ctx
) -> CollectionProtection:
    """Store the owner's signed record of its collection's protection (replacing an earlier
    one). The cloud cannot check the signature (peers do) but refuses a record that names
    another tenant, collection, mode, pe-roi scheme or patch model than it holds. Scope
    `upload`."""
    layout = authorise(ctx, claims, collection, None, "upload").layout
    record = signed.record
    if (record.tenant, record.collection) != (layout.tenant, layout.collection):
        raise HTTPException(
            422,
            f"record names {record.tenant}/{record.collection}, not "
            f"{layout.tenant}/{layout.collection}",
        )
    held = _held(ctx, layout)
    if record.mode != held.mode or record.scheme != held.scheme:
        raise HTTPException(
            409,
            f"record says {record.mode} ({record.scheme}); collection {collection} is "
            f"{held.mode} ({held.scheme})",
        )
    digest = patch_model_sha256(ctx, layout) if held.mode == "sealed" else None
    if record.patch_model != digest:
        raise HTTPException(
            409, f"record names patch model {record.patch_model}; the published one is {digest}"
        )
    body = json.dumps(signed.model_dump(mode="json"), sort_keys=True).encode()
    ctx.store.put(layout.signed_protection, body, "application/json")
    return held.model_copy(update={"signed": signed})
