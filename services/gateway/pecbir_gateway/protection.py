"""A collection's protection mode, as the cloud holds it: pe, sealed or pe-roi.

A searcher of a collection it does not own learns here what its query must be: an image under
the paper's cipher (pe), a Fisher vector (sealed) or an image through the collection's pe-roi
cipher (pe-roi), so that a query never travels in a weaker form than the collection's images.
"""

from __future__ import annotations

from fastapi import APIRouter

from pecbir_contracts.routes import GATEWAY_PROTECTION
from pecbir_contracts.schemas import CollectionProtection
from pecbir_gateway.deps import Caller, Ctx, Owner, authorise
from pecbir_gateway.images import is_sealed_collection, pe_roi_scheme

router = APIRouter(tags=["images"])


@router.get(GATEWAY_PROTECTION, response_model=CollectionProtection)
def protection(collection: str, claims: Caller, ctx: Ctx, owner: Owner = None) -> object:
    """The collection's protection mode (pe, sealed or pe-roi with its scheme); a collection
    without a patch model or pe-roi image is pe. Scope `search`."""
    layout = authorise(ctx, claims, collection, owner, "search").layout
    if is_sealed_collection(ctx, layout):
        return CollectionProtection(collection=layout.collection, mode="sealed")
    scheme = pe_roi_scheme(ctx, layout)
    mode = "pe" if scheme is None else "pe-roi"
    return CollectionProtection(collection=layout.collection, mode=mode, scheme=scheme)
