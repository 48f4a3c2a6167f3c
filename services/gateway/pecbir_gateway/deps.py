"""Request-scoped dependencies: the service context, the caller's claims, collection access."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Annotated

import httpx
from fastapi import Depends, HTTPException, Query, Request

from pecbir_contracts.auth import GATEWAY_TOKEN, SEARCH_TOKEN, Claims, Forbidden, mint_token
from pecbir_contracts.layout import CollectionLayout, check_name
from pecbir_contracts.store import ObjectStore
from pecbir_gateway.dispatch import TaskDispatcher
from pecbir_gateway.settings import GatewaySettings
from pecbir_platform.ratelimit import RateLimiter
from pecbir_platform.web import bearer_claims


@dataclass
class GatewayContext:
    settings: GatewaySettings
    store: ObjectStore
    dispatcher: TaskDispatcher
    search: httpx.Client
    limiter: RateLimiter
    sharing: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)

    @property
    def token_secret(self) -> bytes:
        return self.settings.token_secret.get_secret_value().encode()

    def search_headers(self, access: Access) -> dict[str, str]:
        """Authorization for the search service: a short-lived token of the data owner.

        The gateway has already checked the caller (including consortium sharing), so the
        search service only needs to know whose collection is meant.
        """
        token = mint_token(
            self.token_secret,
            kind=SEARCH_TOKEN,
            sub=f"gateway:{access.claims.sub}",
            tenant=access.owner,
            scopes=("search", "read"),
            ttl_s=60,
        )
        return {"authorization": f"Bearer {token}"}

    # Capability URLs for the filesystem store (S3 back ends presign natively).
    def sign_blob(self, key: str, ttl_s: int) -> str:
        body = json.dumps({"k": key, "e": int(time.time()) + ttl_s}, separators=(",", ":"))
        payload = base64.urlsafe_b64encode(body.encode()).rstrip(b"=").decode()
        tag = hmac.new(self.token_secret, b"blob\x00" + payload.encode(), hashlib.sha256)
        return f"{payload}.{tag.hexdigest()}"

    def open_blob(self, token: str) -> str:
        payload, _, tag = token.partition(".")
        expected = hmac.new(self.token_secret, b"blob\x00" + payload.encode(), hashlib.sha256)
        # Bytes, not str: compare_digest refuses non-ASCII text (which a link may hold).
        if not hmac.compare_digest(tag.encode(), expected.hexdigest().encode()):
            raise HTTPException(403, "invalid download link")
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if time.time() > body["e"]:
            raise HTTPException(403, "download link expired")
        return str(body["k"])


def context(request: Request) -> GatewayContext:
    return request.app.state.context


def caller(request: Request, ctx: Annotated[GatewayContext, Depends(context)]) -> Claims:
    return bearer_claims(request, secret=ctx.token_secret, kind=GATEWAY_TOKEN)


@dataclass(frozen=True)
class Access:
    claims: Claims
    layout: CollectionLayout

    @property
    def owner(self) -> str:
        return self.layout.tenant


def authorise(
    ctx: GatewayContext, claims: Claims, collection: str, owner: str | None, scope: str
) -> Access:
    """Check scope, tenancy and budget; a foreign collection only if shared with the caller's
    tenant. Each scope is also a budget (search, upload, train), per token and per tenant."""
    try:
        claims.require(scope)
        check_name(collection, "collection")
        owner = owner or claims.tenant
        check_name(owner, "owner")
    except Forbidden as exc:
        raise HTTPException(403, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    if owner != claims.tenant:
        readers = ctx.sharing.get((owner, collection), frozenset())
        if scope not in ("search", "read") or claims.tenant not in readers:
            raise HTTPException(
                403, f"collection {owner}/{collection} is not shared with tenant {claims.tenant!r}"
            )
    ctx.limiter.check(scope, claims)
    return Access(claims=claims, layout=CollectionLayout(owner, collection))


Ctx = Annotated[GatewayContext, Depends(context)]
Caller = Annotated[Claims, Depends(caller)]
Owner = Annotated[str | None, Query(description="Owning tenant of a shared collection")]
