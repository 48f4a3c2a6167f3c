"""Bearer tokens: JWT (RFC 7519) signed with HMAC-SHA256, implemented with the stdlib.

Claims: `sub` (who), `tenant` (whose data), `scopes` (what), `iat`/`exp` (when). Only HS256 is
accepted; the `alg` header is checked, never trusted to select an algorithm.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "SCOPES",
    "AuthError",
    "Claims",
    "Forbidden",
    "bearer",
    "mint_token",
    "verify_token",
]

SCOPES = frozenset({"upload", "search", "read", "train", "admin", "decrypt", "key-release"})
_MIN_SECRET_BYTES = 32


class AuthError(Exception):
    """Token missing, malformed, badly signed or expired (→ HTTP 401)."""


class Forbidden(Exception):
    """Valid token, but not allowed to do this (→ HTTP 403)."""


class Claims(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    sub: str = Field(min_length=1)
    tenant: str = Field(min_length=1)
    scopes: tuple[str, ...] = ()
    iat: int
    exp: int

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Forbidden(f"token of {self.sub!r} lacks scope {scope!r}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_secret(secret: bytes) -> bytes:
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"token secret must have at least {_MIN_SECRET_BYTES} bytes")
    return secret


def mint_token(
    secret: bytes,
    *,
    sub: str,
    tenant: str,
    scopes: Iterable[str],
    ttl_s: int = 3600,
    now: float | None = None,
) -> str:
    scopes = tuple(sorted(set(scopes)))
    unknown = set(scopes) - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    issued = int(time.time() if now is None else now)
    header = {"alg": "HS256", "typ": "JWT"}
    payload = {"sub": sub, "tenant": tenant, "scopes": list(scopes), "iat": issued}
    payload["exp"] = issued + int(ttl_s)
    signing_input = ".".join(
        _b64(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload)
    )
    signature = hmac.new(_check_secret(secret), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def verify_token(
    secret: bytes, token: str, *, now: float | None = None, leeway_s: int = 5
) -> Claims:
    try:
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = json.loads(_unb64(header_b64))
        signature = _unb64(signature_b64)
    except (ValueError, json.JSONDecodeError):
        raise AuthError("malformed bearer token") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise AuthError("unsupported token algorithm (only HS256 is accepted)")
    expected = hmac.new(
        _check_secret(secret), f"{header_b64}.{payload_b64}".encode(), hashlib.sha256
    ).digest()
    if not hmac.compare_digest(signature, expected):
        raise AuthError("bad token signature")
    try:
        claims = Claims.model_validate(json.loads(_unb64(payload_b64)))
    except (ValueError, ValidationError):
        raise AuthError("token payload lacks sub/tenant/iat/exp") from None
    current = time.time() if now is None else now
    if current > claims.exp + leeway_s:
        raise AuthError("token expired")
    return claims


def bearer(authorization: str | None) -> str:
    """The token from an `Authorization: Bearer …` header."""
    if not authorization:
        raise AuthError("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization header must be 'Bearer <token>'")
    return token.strip()
