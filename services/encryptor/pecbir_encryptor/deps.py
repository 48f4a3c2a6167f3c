"""Request-scoped dependencies of the encryptor: its context, the caller's claims, checks.

The encryptor's users hold tokens of this service (signed with the hospital's own secret,
not the cloud's) and must belong to the tenant it serves; every refusal is audited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import httpx
from fastapi import Depends, HTTPException, Request

from pecbir_contracts.auth import ENCRYPTOR_TOKEN, AuthError, Claims
from pecbir_contracts.layout import check_name
from pecbir_encryptor.core import Encryptor
from pecbir_encryptor.credentials import PacsCredentials, looks_like_api_key
from pecbir_encryptor.gateway_client import GatewayError, gateway_http_client
from pecbir_encryptor.keyring import Keyring
from pecbir_encryptor.protection import load_signing_key
from pecbir_encryptor.settings import EncryptorSettings
from pecbir_platform.ratelimit import RateLimiter
from pecbir_platform.web import require_scope, verify_bearer
from pecore.keys import MasterKey

__all__ = [
    "CHALLENGE",
    "SECURITY_SCHEMES",
    "Caller",
    "Ctx",
    "EncryptorContext",
    "authenticator",
    "build_encryptor",
    "caller",
    "collection_name",
    "context",
    "gateway_failed",
]

# What a 401 asks for: a user's token, or a PACS account's basic credentials.
CHALLENGE = 'Bearer, Basic realm="pecbir-encryptor"'
# The OpenAPI security schemes of the encryptor (`pecbir_platform.web.document_api`).
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT or PACS API key",
        "description": "A user's token of this encryptor (`pecbir token mint --kind encryptor`), "
        "or a PACS account's API key `pcb.…` (`pecbir token mint --kind pacs`)",
    },
    "pacsApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "A PACS account's API key (long-lived, revocable, stored hashed)",
    },
    "pacsBasic": {
        "type": "http",
        "scheme": "basic",
        "description": "A PACS that can only send a user name and password: "
        "`<PACS account>:<API key>`",
    },
}

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
    # Who a request's headers say the caller is (AuthError if nobody): `authenticator`.
    authenticate: Callable[[dict[bytes, bytes]], Claims] = field(default=None)  # type: ignore[assignment]

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
        pending_dir=settings.pending_dir,
        template_collections=settings.template_collections,
        content_index=settings.content_index,
        signing_key=load_signing_key(settings.signing_key) if settings.signing_key else None,
        trusted_owners=settings.trusted_owners,
        dicom_refs_dir=settings.dicom_refs_dir,
    )


def authenticator(
    secret: bytes, credentials: PacsCredentials | None
) -> Callable[[dict[bytes, bytes]], Claims]:
    """The check of a request's credentials: a user's bearer token of this service, or a PACS
    account's API key (``X-API-Key``, ``Bearer pcb.…`` or HTTP basic ``<account>:<key>``).

    Parameters
    ----------
    secret
        The HMAC secret of the service's user tokens.
    credentials
        The PACS accounts (None: users' tokens only).

    Returns
    -------
    callable
        Headers (lower-case byte names, as ASGI gives them) to claims; raises `AuthError`.
    """

    def authenticate(headers: dict[bytes, bytes]) -> Claims:
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, value = authorization.partition(" ")
        api_key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
        if credentials is not None:
            if api_key:
                return credentials.verify(api_key)
            if scheme.lower() == "basic":
                return credentials.verify_basic(value)
            if scheme.lower() == "bearer" and looks_like_api_key(value.strip()):
                return credentials.verify(value)
        elif api_key or scheme.lower() == "basic":
            raise AuthError(
                "this encryptor has no PACS accounts (PECBIR_ENCRYPTOR_PACS_CREDENTIALS)"
            )
        return verify_bearer(secret, authorization, kind=ENCRYPTOR_TOKEN)

    return authenticate


def context(request: Request) -> EncryptorContext:
    return request.app.state.context


def caller(request: Request, ctx: Annotated[EncryptorContext, Depends(context)]) -> Claims:
    """The caller's claims: a valid token of this service, of the tenant it serves (audited)."""
    audit = ctx.encryptor.audit
    try:
        claims = ctx.authenticate(dict(request.headers.raw))
    except AuthError as exc:
        audit.unauthenticated(str(exc))
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": CHALLENGE}) from None
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
