"""Web helpers every HTTP service shares: the request guard, bearer claims, capped reads, errors.

The services differ in whose tokens they accept (the cloud's or the hospital's) and in what
they check on top (tenancy, audit), so each keeps its own `deps.caller`; what is the same
everywhere (no body byte read before the token and the declared size are checked, 401 with
``WWW-Authenticate``, 403 for a missing scope, 413/422 for an upload, 503 with
``Retry-After`` when the object store is down) is defined here, once.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse

from pecbir_contracts.auth import AuthError, Claims, Forbidden, TokenKind, bearer, verify_token
from pecbir_contracts.routes import HEALTHZ
from pecbir_contracts.store import ObjectNotFound, StorageError
from pecbir_platform.revocation import check_not_revoked

__all__ = [
    "BEARER_SCHEME",
    "DOCS_ASSETS",
    "ERROR_EXAMPLES",
    "MULTIPART_OVERHEAD_BYTES",
    "PUBLIC_PATHS",
    "REASON_HEADER",
    "STORE_RETRY_AFTER_S",
    "RequestGuard",
    "add_healthz",
    "add_reason_headers",
    "add_store_error_handlers",
    "bearer_claims",
    "document_api",
    "guard_requests",
    "read_body_limited",
    "read_limited",
    "reason_header",
    "require_scope",
    "spool_body_limited",
    "verify_bearer",
]

log = logging.getLogger(__name__)

# Seconds a client is told to wait after the object store failed (a restart, a failover).
STORE_RETRY_AFTER_S = 5
# Paths answered without a token (probes, metrics, API docs); they take no body.
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)
# Room for multipart framing and small form fields around the file parts.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body larger than the limit of {limit} bytes")


class RequestGuard:
    """Pure ASGI middleware: token and declared size checked on the headers, body counted.

    A request without a valid bearer token of the service is answered 401 before one byte of
    its body is read (so it costs a header parse and an HMAC, whatever it sends); one whose
    ``Content-Length`` is over the limit, 413; a body that grows past the limit while it is
    read (chunked, or lying about its length) fails with 413 at the first byte over. Public
    paths (`PUBLIC_PATHS` and `public_prefixes`) need no token and may carry no body.

    Parameters
    ----------
    app
        The ASGI application to guard.
    secret
        HMAC secret of the tokens the service accepts.
    kind
        The kind of token (audience, issuer, longest lifetime) the service accepts.
    max_body_bytes
        Largest request body accepted on any route.
    public_prefixes
        Path prefixes that authenticate otherwise (the gateway's capability URLs).
    on_unauthenticated
        Called with the reason for each request refused with 401 (the encryptor audits).
    body_limits
        (path prefix, largest body) pairs that replace `max_body_bytes` on those paths (the
        encryptor's STOW-RS root, which spools its body to disk); the first match wins.
    authenticate
        Checks a request's headers instead of the bearer token alone (raises `AuthError`):
        the encryptor also takes its PACS credentials. Default: `verify_bearer`.
    challenge
        The ``WWW-Authenticate`` value of a 401.
    """

    def __init__(
        self,
        app: Any,
        *,
        secret: bytes,
        kind: TokenKind,
        max_body_bytes: int,
        public_prefixes: Collection[str] = (),
        on_unauthenticated: Callable[[str], None] | None = None,
        authenticate: Callable[[dict[bytes, bytes]], Claims] | None = None,
        challenge: str = "Bearer",
        body_limits: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.app = app
        self.body_limits = tuple(body_limits)
        self.authenticate = authenticate
        self.challenge = challenge
        self.secret = secret
        self.kind = kind
        self.max_body_bytes = max_body_bytes
        self.public_prefixes = tuple(public_prefixes)
        self.on_unauthenticated = on_unauthenticated

    def _limit(self, path: str) -> int:
        """The largest body accepted on `path`."""
        matches = (n for prefix, n in self.body_limits if path.startswith(prefix))
        return next(matches, self.max_body_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        public = (
            path in PUBLIC_PATHS
            or path.startswith(DOCS_ASSETS + "/")
            or path.startswith(self.public_prefixes)
        )
        headers = {name: value for name, value in scope.get("headers", [])}
        if not public:
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            try:
                if self.authenticate is not None:
                    self.authenticate(headers)
                else:
                    verify_bearer(self.secret, authorization, kind=self.kind)
            except AuthError as exc:
                if self.on_unauthenticated is not None:
                    self.on_unauthenticated(str(exc))
                await _answer(send, 401, str(exc), {"www-authenticate": self.challenge})
                return
        limit = 0 if public else self._limit(path)
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _answer(send, 400, "invalid Content-Length header")
                return
            if int(declared) > limit:
                await _answer(send, 413, str(_too_large(limit).detail))
                return
        received = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except HTTPException as exc:
            if started or exc.status_code != 413:
                raise
            await _answer(send, 413, str(exc.detail))


def reason_header(text: str, limit: int = 200) -> str:
    """`text` as a header value: printable ASCII without quotes, at most `limit` characters.

    Parameters
    ----------
    text
        A human-readable reason.
    limit
        Longest value.
    """
    return "".join(c if 32 <= ord(c) < 127 and c != '"' else "?" for c in text)[:limit]


#: The header that repeats an error's reason: machines (a PACS) log headers, not JSON bodies.
REASON_HEADER = "X-Pecbir-Reason"


def add_reason_headers(app: FastAPI) -> None:
    """Every error answer of `app` (HTTPException) also carries its detail in `REASON_HEADER`.

    Parameters
    ----------
    app
        The application.
    """
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def with_reason(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        headers.setdefault(REASON_HEADER, reason_header(str(exc.detail)))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    app.add_exception_handler(StarletteHTTPException, with_reason)


async def _answer(
    send: Any, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [
        (REASON_HEADER.lower().encode(), reason_header(detail).encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # The body was not read: the connection cannot carry another request.
        (b"connection", b"close"),
        *((name.encode(), value.encode()) for name, value in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def guard_requests(
    app: FastAPI,
    *,
    secret: bytes,
    kind: TokenKind,
    max_body_bytes: int,
    public_prefixes: Collection[str] = (),
    on_unauthenticated: Callable[[str], None] | None = None,
    authenticate: Callable[[dict[bytes, bytes]], Claims] | None = None,
    challenge: str = "Bearer",
    body_limits: Sequence[tuple[str, int]] = (),
) -> None:
    """Install `RequestGuard` on `app` (add it before the observability middleware, so that
    refusals are counted and carry a request id).

    Parameters
    ----------
    app
        The application.
    secret, kind, max_body_bytes, public_prefixes, on_unauthenticated, authenticate, challenge
        As for `RequestGuard`.
    body_limits
        As for `RequestGuard`.
    """
    app.add_middleware(
        RequestGuard,
        secret=secret,
        kind=kind,
        max_body_bytes=max_body_bytes,
        public_prefixes=public_prefixes,
        on_unauthenticated=on_unauthenticated,
        authenticate=authenticate,
        challenge=challenge,
        body_limits=body_limits,
    )


async def read_body_limited(request: Request, *, limit: int) -> bytes:
    """The request's body, refused with 413 by its Content-Length or at the first byte over.

    Parameters
    ----------
    request
        The incoming request.
    limit
        Largest accepted body in bytes.

    Returns
    -------
    bytes
        The whole body.

    Raises
    ------
    HTTPException
        413 when the body is (or declares to be) larger than `limit`.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def spool_body_limited(
    request: Request, *, limit: int, directory: Path | None = None
) -> Path:
    """The request's body written to a new temporary file (0600), never held in memory whole;
    refused with 413 by its Content-Length or at the first byte over `limit` (the file is
    then removed). The caller removes the file when done.

    Parameters
    ----------
    request
        The incoming request.
    limit
        Largest accepted body in bytes.
    directory
        Where the file goes (default: the system's temporary directory).

    Returns
    -------
    Path
        The file holding the body.

    Raises
    ------
    HTTPException
        413 when the body is (or declares to be) larger than `limit`.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    descriptor, name = tempfile.mkstemp(prefix="pecbir-body-", dir=directory)
    path = Path(name)
    try:
        size = 0
        with os.fdopen(descriptor, "wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                handle.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def verify_bearer(secret: bytes, authorization: str | None, *, kind: TokenKind) -> Claims:
    """The claims of an ``Authorization: Bearer <token>`` header's token, not revoked.

    Parameters
    ----------
    secret
        HMAC secret the token must be signed with.
    authorization
        The header's value.
    kind
        The kind of token the service accepts.

    Raises
    ------
    AuthError
        As `verify_token`, or the token is revoked (`pecbir_platform.revocation`).
    """
    claims = verify_token(secret, bearer(authorization), kind=kind)
    check_not_revoked(claims)
    return claims


def bearer_claims(request: Request, *, secret: bytes, kind: TokenKind) -> Claims:
    """The verified claims of the request's bearer token.

    Parameters
    ----------
    request
        The incoming request; its ``Authorization: Bearer <token>`` header is read.
    secret
        HMAC secret the token must be signed with.
    kind
        The kind of token the service accepts.

    Returns
    -------
    Claims
        The token's claims (signature and expiry checked).

    Raises
    ------
    HTTPException
        401 with ``WWW-Authenticate: Bearer`` when the token is missing, malformed, badly
        signed or expired; the detail is the reason.
    """
    try:
        return verify_bearer(secret, request.headers.get("authorization"), kind=kind)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


def require_scope(claims: Claims, scope: str) -> None:
    """Raise HTTP 403 unless `claims` grant `scope` (or ``admin``).

    Parameters
    ----------
    claims
        The caller's verified claims.
    scope
        The scope the operation needs (one of `pecbir_contracts.auth.SCOPES`).

    Raises
    ------
    HTTPException
        403, with the reason, when the scope is missing.
    """
    try:
        claims.require(scope)
    except Forbidden as exc:
        raise HTTPException(403, str(exc)) from None


def read_limited(upload: UploadFile, *, limit: int, what: str, refuse_empty: bool = True) -> bytes:
    """The bytes of an uploaded file, read with a size cap (never more than `limit` + 1).

    Parameters
    ----------
    upload
        The multipart file part.
    limit
        Largest accepted size in bytes.
    what
        Name of the part, for the error message (``"cipher"``, ``"mask"``, ``"image"``).
    refuse_empty
        Answer 422 for an empty part. Off where the parser that follows gives the better
        message for empty input (the encryptor's image readers).

    Returns
    -------
    bytes
        The whole part.

    Raises
    ------
    HTTPException
        413 when the part is larger than `limit`; 422 when it is empty and `refuse_empty`.
    """
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{what}: larger than the limit of {limit} bytes")
    if refuse_empty and not data:
        raise HTTPException(422, f"{what}: empty file")
    return data


def _storage_failed(_request: Request, exc: Exception) -> JSONResponse:
    # The cause (a file path, a bucket, an endpoint) goes to the log, never to the client.
    log.error("object store failed: %s", exc)
    return JSONResponse(
        status_code=503,
        content={"detail": "object store unavailable"},
        headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
    )


def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(exc)})


def add_store_error_handlers(app: FastAPI) -> None:
    """Answer object-store errors that escape a route: 503 + ``Retry-After``, or 404.

    Parameters
    ----------
    app
        The application to install the handlers on. `StorageError` (store unreachable,
        transient) becomes 503 with ``Retry-After``; `ObjectNotFound` becomes 404.
    """
    app.add_exception_handler(StorageError, _storage_failed)
    app.add_exception_handler(ObjectNotFound, _not_found)


def add_healthz(
    app: FastAPI,
    *,
    secret: Callable[[], bytes],
    kind: TokenKind,
    details: Callable[[], dict[str, object]],
) -> None:
    """`/healthz`, the same on every service: ``{"status": "ok"}`` while the process answers.

    Parameters
    ----------
    app
        The application to add the route to.
    secret
        The HMAC secret of the service's own bearer tokens (read on each call).
    kind
        The kind of token the service accepts.
    details
        What the operator may see (store, tenant, key id, counters): only with a valid token
        of the service. Unauthenticated, they would tell anyone where the data is and which
        key protects it.
    """

    @app.get(
        HEALTHZ,
        tags=["ops"],
        summary="Liveness",
        description='`{"status": "ok"}` while the process answers. With a valid bearer '
        "token of this service the answer adds details (store, tenant, key id, counters); a "
        "token that does not verify gets 401.",
    )
    def healthz(request: Request) -> dict[str, object]:
        answer: dict[str, object] = {"status": "ok"}
        if request.headers.get("authorization"):
            bearer_claims(request, secret=secret(), kind=kind)
            answer.update(details())
        return answer


#: Where the interactive docs' Swagger UI files are served from (the app itself, no CDN).
DOCS_ASSETS = "/docs/assets"


#: One example body per error status the services answer (all are ``{"detail": "..."}``).
ERROR_EXAMPLES: dict[int, tuple[str, str]] = {
    401: ("Missing, malformed, badly signed or expired bearer token", "token expired"),
    403: ("The token lacks the scope, or is of another tenant", "token lacks scope 'upload'"),
    404: ("No such image, version or collection", "no image 0f3a… in collection brain"),
    409: (
        "Conflict: an Idempotency-Key reused with another body, a collection without a "
        "model yet, or (STOW-RS) nothing stored",
        "Idempotency-Key was already used for a different upload; use a new key",
    ),
    413: ("A part or the body is larger than the limit", "image: larger than the limit of …"),
    415: ("Not a body this route reads", 'not multipart/related; type="application/dicom"'),
    422: ("The input is not usable; the message says why", "PNG mode P is not a grey image"),
    503: (
        "A dependency (object store, broker, search) is unavailable; retry after Retry-After",
        "object store unavailable: S3 endpoint 127.0.0.1:9000 unreachable",
    ),
}


def _error_codes(path: str, method: str, operation: dict) -> set[int]:
    """The error statuses an operation can answer, from what it is (one rule per status)."""
    if path == HEALTHZ:
        return {401}
    if path.startswith("/v1/blobs/"):  # a signed link, no bearer token
        return {403, 404, 503}
    codes = {401, 403, 422, 503}
    if method == "get" or any(p in path for p in ("{image_id}", "{version}", "{study}")):
        codes.add(404)
    if "requestBody" in operation:
        codes.add(413)
    if (path.endswith(("/images", "/search", "/knn")) and method == "post") or "dicomweb" in path:
        codes.add(409)
    if "dicomweb" in path:
        codes.add(415)
    return codes


def _with_error_responses(document: dict) -> dict:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = {
        "type": "object",
        "properties": {"detail": {"type": "string"}},
        "required": ["detail"],
    }
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            # The route's own declared errors get the shared example body too.
            declared = {int(c) for c in responses if c.isdigit() and int(c) in ERROR_EXAMPLES}
            for code in sorted(_error_codes(path, method, operation) | declared):
                description, example = ERROR_EXAMPLES[code]
                entry = responses.setdefault(str(code), {"description": description})
                entry.setdefault(
                    "content",
                    {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/Error"},
                            "example": {"detail": example},
                        }
                    },
                )
                if code == 503:
                    entry["headers"] = {
                        "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}
                    }
    return document


#: The security scheme every service declares: its own signed JWTs (`pecbir_contracts.auth`).
BEARER_SCHEME = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A token of this service (HS256; `pecbir token mint --kind …`)",
    }
}


def _with_security(document: dict, schemes: dict[str, dict]) -> dict:
    """Declare `schemes` and require one of them on every operation but the public ones."""
    document.setdefault("components", {})["securitySchemes"] = schemes
    requirement = [{name: []} for name in schemes]
    for path, operations in document.get("paths", {}).items():
        public = path in PUBLIC_PATHS or path.startswith("/v1/blobs/")
        for operation in operations.values():
            operation["security"] = [{}] if public else requirement
    return document


def document_api(app: FastAPI, *, security_schemes: dict[str, dict] | None = None) -> None:
    """The API documentation of a service: the error responses of every operation in the
    OpenAPI document (`ERROR_EXAMPLES`), its security schemes, and `/docs` served with the
    Swagger UI files of the swagger-ui-bundle package, so that the docs work without internet
    access, as hospitals' machines often are (FastAPI's default page loads them from a CDN;
    ReDoc, CDN only, is removed).

    Parameters
    ----------
    app
        The application.
    security_schemes
        OpenAPI security schemes the service accepts (default `BEARER_SCHEME`); an operation
        needs one of them, except the public paths.
    """
    schemes = security_schemes or BEARER_SCHEME
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    plain_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _with_security(_with_error_responses(plain_openapi()), schemes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    cdn_pages = {app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    app.router.routes[:] = [
        route for route in app.router.routes if getattr(route, "path", None) not in cdn_pages
    ]
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")
    openapi_url, title = app.openapi_url or "/openapi.json", f"{app.title} – API"

    @app.get("/docs", include_in_schema=False)
    def docs() -> object:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=title,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )
