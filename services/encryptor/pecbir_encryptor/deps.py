"""Request-scoped dependencies of the encryptor: its context, the caller's claims, checks.

The encryptor's users hold tokens of this service (signed with the hospital's own secret,
not the cloud's) and must belong to the tenant it serves; every refusal is audited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import httpx
from fastapi import Depends, HTTPException, Request

from pecbir_contracts.auth import ENCRYPTOR_TOKEN, Claims
from pecbir_contracts.layout import check_name
from pecbir_encryptor.core import Encryptor
from pecbir_encryptor.gateway_client import GatewayError, gateway_http_client
from pecbir_encryptor.keyring import Keyring
from pecbir_encryptor.settings import EncryptorSettings
from pecbir_platform.ratelimit import RateLimiter
from pecbir_platform.web import bearer_claims, require_scope
from pecore.keys import MasterKey

__all__ = [
    "Caller",
    "Ctx",
    "EncryptorContext",
    "build_encryptor",
    "caller",
    "collection_name",
    "context",
    "gateway_failed",
]

# Gateway answers passed on as they are; any other failure of the cloud is a bad gateway.
# 429: the tenant's budget at the gateway is spent (the caller retries, as it would here).
_PASSED_ON_STATUSES = (404, 409, 413, 422, 429)


@dataclass
class EncryptorContext:
    """What every route of the encryptor works with.

    Attributes
    ----------
    settings
        The service's settings.
    encryptor
        The owner-side operations (keys, gateway client, audit log).
    limiter
        The budgets of the service's users (per token and per tenant).
    """

    settings: EncryptorSettings
    encryptor: Encryptor
    limiter: RateLimiter

    def permit(self, claims: Claims, scope: str) -> None:
        """403 unless `claims` grant `scope`; 429 when the caller's budget for it is spent."""
        require_scope(claims, scope)
        self.limiter.check(scope, claims)

    @property
    def user_token_secret(self) -> bytes:
        return self.settings.user_token_secret.get_secret_value().encode()


def build_encryptor(
    settings: EncryptorSettings,
    *,
    master: MasterKey | Keyring | None = None,
    gateway_client: httpx.Client | None = None,
) -> Encryptor:
    """The encryptor of `settings`: its keyring, an authenticated gateway client, its audit log.

    Parameters
    ----------
    settings
        Scheme, key mode, key files, gateway URL/token and audit-log path.
    master
        A master key or keyring to use instead of loading the key files (tests, demos).
    gateway_client
        An HTTP client of the gateway to use instead of one for ``settings.gateway_url``;
        the tenant's bearer token is set on it either way.

    Returns
    -------
    Encryptor
        The owner-side operations, ready to serve.
    """
    master = master or Keyring.load(settings.master_key, settings.keyring_dir)
    return Encryptor(
        master,
        gateway_http_client(settings, client=gateway_client),
        scheme=settings.scheme,
        key_mode=settings.key_mode,
        audit_log=settings.audit_log,
        tenant=settings.tenant,
        sealed_collections=settings.sealed_collections,
        patch_models=settings.patch_models,
        accept_unbound_records=settings.accept_unbound_records,
        pe_roi_collections=settings.pe_roi_collections,
        pe_roi_scheme=settings.pe_roi_scheme,
    )


def context(request: Request) -> EncryptorContext:
    return request.app.state.context


def caller(request: Request, ctx: Annotated[EncryptorContext, Depends(context)]) -> Claims:
    """The caller's claims: a valid token of this service, of the tenant it serves (audited)."""
    audit = ctx.encryptor.audit
    try:
        claims = bearer_claims(request, secret=ctx.user_token_secret, kind=ENCRYPTOR_TOKEN)
    except HTTPException as exc:
        audit.unauthenticated(str(exc.detail))
        raise
    tenant = ctx.settings.tenant
    if claims.tenant != tenant:
        audit.write(
            action=request.url.path, sub=claims.sub, outcome="denied", reason="other tenant"
        )
        raise HTTPException(403, f"this encryptor serves tenant {tenant!r}")
    return claims


def collection_name(collection: str) -> str:
    """`collection` if it is a valid collection name, else HTTP 422."""
    try:
        return check_name(collection, "collection")
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def gateway_failed(exc: GatewayError) -> HTTPException:
    """The HTTP error to answer when the gateway refused or failed a call."""
    status = exc.status if exc.status in _PASSED_ON_STATUSES else 502
    headers = {"Retry-After": "1"} if status == 429 else None
    return HTTPException(status, f"cloud gateway: {exc.detail}", headers=headers)


Ctx = Annotated[EncryptorContext, Depends(context)]
Caller = Annotated[Claims, Depends(caller)]
