"""Bearer tokens: JWT (RFC 7519) signed with HMAC-SHA256, minted and checked with PyJWT.

Claims: `sub` (who), `tenant` (whose data), `scopes` (what), `iss`/`aud` (which issuer, for
which service: a `TokenKind`), `iat`/`nbf`/`exp` (when). Only HS256 is accepted; the `alg`
header is checked, never trusted to select an algorithm. PyJWT (a maintained library) does
the signature and time checks; this module adds what it leaves open: canonical base64url
only (a token has exactly one spelling), `iat` never in the future, a lifetime no longer than
the kind allows, and secrets that are long enough and not a placeholder from the repository.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ENCRYPTOR_TOKEN",
    "GATEWAY_TOKEN",
    "MIN_SECRET_BYTES",
    "SCOPES",
    "SEARCH_TOKEN",
    "TOKEN_KINDS",
    "AuthError",
    "Claims",
    "Forbidden",
    "InsecureSecret",
    "TokenKind",
    "bearer",
    "check_secret",
    "mint_token",
    "verify_token",
]

SCOPES = frozenset({"upload", "search", "read", "train", "admin", "decrypt", "key-release"})
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class TokenKind:
    """Who issues a token, for which service, for how long at most.

    Attributes
    ----------
    audience
        The `aud` claim: the one service that accepts the token.
    issuer
        The `iss` claim: who mints such tokens.
    max_ttl_s
        Longest accepted lifetime (``exp - iat``), in seconds.
    """

    audience: str
    issuer: str
    max_ttl_s: int


# Tokens of the cloud's clients (hospitals' encryptors, operators): minted by the cloud's admin.
GATEWAY_TOKEN = TokenKind("pecbir-gateway", "pecbir-cloud", 30 * 24 * 3600)
# The gateway's short-lived token of the data owner, for one call to the search service.
SEARCH_TOKEN = TokenKind("pecbir-search", "pecbir-gateway", 300)
# A hospital's users at its own encryptor (a working day).
ENCRYPTOR_TOKEN = TokenKind("pecbir-encryptor", "pecbir-hospital", 12 * 3600)
TOKEN_KINDS = {kind.audience: kind for kind in (GATEWAY_TOKEN, SEARCH_TOKEN, ENCRYPTOR_TOKEN)}

# Words of the placeholder secrets that ship in deploy/, docs/ and the READMEs (tests collect
# every one and check it is refused).
_PLACEHOLDER = re.compile(r"change-?me|replace-?me|placeholder|example|your-|x{8}", re.IGNORECASE)
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class AuthError(Exception):
    """Token missing, malformed, badly signed or expired (→ HTTP 401)."""


class Forbidden(Exception):
    """Valid token, but not allowed to do this (→ HTTP 403)."""


class InsecureSecret(ValueError):
    """A configured secret too short or a placeholder: the service refuses to start."""


class Claims(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    sub: str = Field(min_length=1)
    tenant: str = Field(min_length=1)
    scopes: tuple[str, ...] = ()
    iat: int
    exp: int
    # The token's id (RFC 7519 `jti`), what a revocation names; None in tokens minted before
    # it was added, which can be revoked only by subject.
    jti: str | None = None

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Forbidden(f"token of {self.sub!r} lacks scope {scope!r}")


def check_secret(secret: bytes | str, name: str) -> bytes:
    """`secret` as bytes if it can sign tokens; else `InsecureSecret` naming `name`.

    Parameters
    ----------
    secret
        The configured secret.
    name
        The environment variable (or setting) it came from, for the message.

    Returns
    -------
    bytes
        The secret.

    Raises
    ------
    InsecureSecret
        Shorter than `MIN_SECRET_BYTES`, a placeholder shipped in the repository, or with
        fewer than 8 distinct characters (``"a" * 32``).
    """
    value = secret.encode() if isinstance(secret, str) else bytes(secret)
    hint = "set a random one, e.g. python -c 'import secrets; print(secrets.token_hex(32))'"
    if len(value) < MIN_SECRET_BYTES:
        raise InsecureSecret(f"{name} has {len(value)} bytes; need {MIN_SECRET_BYTES}+: {hint}")
    if _PLACEHOLDER.search(value.decode("latin-1")) or len(set(value)) < 8:
        raise InsecureSecret(f"{name} is a placeholder, not a secret: {hint}")
    return value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _is_canonical(segment: str) -> bool:
    """Unpadded base64url whose decoding encodes back to the same text (no spare bits set)."""
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        return False
    decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    return _b64(decoded) == segment


def _signing_key(secret: bytes) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"token secret must have at least {MIN_SECRET_BYTES} bytes")
    return secret


def mint_token(
    secret: bytes,
    *,
    kind: TokenKind,
    sub: str,
    tenant: str,
    scopes: Iterable[str],
    ttl_s: int = 3600,
    now: float | None = None,
) -> str:
    """A signed token of `kind` for `sub` of `tenant` with `scopes`, valid for `ttl_s`.

    Raises
    ------
    ValueError
        Unknown scopes, a lifetime over ``kind.max_ttl_s``, or a secret under 32 bytes.
    """
    scopes = tuple(sorted(set(scopes)))
    unknown = set(scopes) - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; known: {sorted(SCOPES)}")
    if not 0 < ttl_s <= kind.max_ttl_s:
        raise ValueError(f"{kind.audience} tokens live at most {kind.max_ttl_s} s, not {ttl_s}")
    issued = int(time.time() if now is None else now)
    payload = {
        "iss": kind.issuer,
        "aud": kind.audience,
        "sub": sub,
        "tenant": tenant,
        "scopes": list(scopes),
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_s),
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(payload, _signing_key(secret), algorithm="HS256")


def verify_token(
    secret: bytes, token: str, *, kind: TokenKind, now: float | None = None, leeway_s: int = 5
) -> Claims:
    """The claims of `token` if it is a valid token of `kind` signed with `secret`.

    Raises
    ------
    AuthError
        Malformed or non-canonical, not HS256, badly signed, of another issuer or audience,
        not yet valid, expired, or living longer than ``kind.max_ttl_s``.
    """
    segments = token.split(".")
    if len(segments) != 3 or not all(_is_canonical(s) for s in segments):
        raise AuthError("malformed bearer token (expected three canonical base64url parts)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise AuthError("malformed bearer token") from None
    if header.get("alg") != "HS256":
        raise AuthError("unsupported token algorithm (only HS256 is accepted)")
    current = time.time() if now is None else now
    try:
        payload = jwt.decode(
            token,
            _signing_key(secret),
            algorithms=["HS256"],
            audience=kind.audience,
            issuer=kind.issuer,
            leeway=leeway_s,
            options={
                "require": ["iss", "aud", "sub", "iat", "nbf", "exp"],
                "verify_exp": now is None,
                "verify_nbf": now is None,
                "verify_iat": now is None,
            },
        )
    except jwt.InvalidSignatureError:
        raise AuthError("bad token signature") from None
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidAudienceError:
        raise AuthError(f"token is not for this service (audience {kind.audience})") from None
    except jwt.InvalidIssuerError:
        raise AuthError(f"token not issued by {kind.issuer}") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    try:
        claims = Claims.model_validate(payload)
        not_before = int(payload["nbf"])
    except (ValueError, TypeError, ValidationError):
        raise AuthError("token payload lacks sub/tenant/iat/exp") from None
    # Checked here too: with an explicit `now` (tests) PyJWT's clock checks are off.
    if current > claims.exp + leeway_s:
        raise AuthError("token expired")
    if claims.iat > current + leeway_s or not_before > current + leeway_s:
        raise AuthError("token not valid yet (iat/nbf in the future)")
    if claims.exp - claims.iat > kind.max_ttl_s:
        raise AuthError(f"token lifetime exceeds {kind.max_ttl_s} s for {kind.audience}")
    return claims


def bearer(authorization: str | None) -> str:
    """The token from an `Authorization: Bearer …` header."""
    if not authorization:
        raise AuthError("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization header must be 'Bearer <token>'")
    return token.strip()
