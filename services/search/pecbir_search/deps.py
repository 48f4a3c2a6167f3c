"""Request-scoped dependencies of the search service: its engine, the caller, the collection."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from pecbir_contracts.auth import SEARCH_TOKEN, Claims
from pecbir_contracts.layout import check_name
from pecbir_platform.web import bearer_claims, require_scope
from pecbir_search.engine import CollectionState, SearchEngine
from pecbir_search.settings import SearchSettings

__all__ = ["Engine", "State", "caller", "collection_state", "engine"]


def engine(request: Request) -> SearchEngine:
    return request.app.state.engine


def caller(request: Request) -> Claims:
    """The claims of a valid cloud token (the gateway's short-lived token of the data owner)."""
    settings: SearchSettings = request.app.state.settings
    return bearer_claims(
        request, secret=settings.token_secret.get_secret_value().encode(), kind=SEARCH_TOKEN
    )


def collection_state(
    collection: str,
    claims: Annotated[Claims, Depends(caller)],
    search_engine: Annotated[SearchEngine, Depends(engine)],
    owner: str | None = None,
) -> CollectionState:
    """The state of the caller's collection (caught up on first use); 403/422 if not allowed."""
    owner = owner or claims.tenant
    try:
        check_name(owner, "owner")
        check_name(collection, "collection")
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    require_scope(claims, "search")
    if owner != claims.tenant:
        # The gateway resolves consortium sharing and calls with the owner's tenant.
        raise HTTPException(403, f"token of tenant {claims.tenant!r} cannot search {owner!r}")
    return search_engine.collection(owner, collection)


Engine = Annotated[SearchEngine, Depends(engine)]
State = Annotated[CollectionState, Depends(collection_state)]
