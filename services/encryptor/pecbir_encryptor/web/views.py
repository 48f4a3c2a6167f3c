"""The routes of the pages (`/ui`): sign-in, query, result, images, exports, audit trail.

None of them is part of the API document: they answer HTML and images to a browser with a
session cookie, not JSON to a bearer token.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from PIL import Image

from pecbir_contracts.auth import ENCRYPTOR_TOKEN, AuthError, Claims, verify_token
from pecbir_contracts.layout import check_image_id, check_name
from pecbir_contracts.png import decode_image_png, encode_png
from pecbir_encryptor.deps import EncryptorContext, context
from pecbir_encryptor.dicom_refs import viewer_link
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_encryptor.inputs import read_mask, read_pixels
from pecbir_encryptor.integrity import IntegrityError
from pecbir_encryptor.peers import PeerKeys
from pecbir_encryptor.web.results import (
    CLASS_NAMES,
    Hit,
    QueryResult,
    ResultCache,
    Source,
    outline_png,
    run_query,
    shown_uint8,
)
from pecbir_encryptor.web.session import (
    SESSION_COOKIE,
    LoginRequired,
    check_csrf,
    check_login_csrf,
    csrf_token,
    new_login_csrf_value,
    session_claims,
    set_login_csrf,
    set_session,
)
from pecbir_platform.web import read_limited, require_scope

__all__ = ["UI_PREFIX", "install"]

UI_PREFIX = "/ui"
MAX_UI_K = 50
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)

# Pages and decrypted images: nothing from elsewhere, never framed, never cached.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@dataclass
class Session:
    """The signed-in user of a request.

    Attributes
    ----------
    claims
        Their token's claims.
    token
        The token (the cookie's value).
    csrf
        The session's CSRF token.
    """

    claims: Claims
    token: str
    csrf: str


@dataclass
class WebState:
    """What the pages keep between requests: the latest results and the peers' clients.

    Attributes
    ----------
    results
        The latest query results (memory only).
    peers
        Other hospitals' key release.
    """

    results: ResultCache
    peers: PeerKeys


def _state(request: Request) -> WebState:
    return request.app.state.web


def session(request: Request, ctx: Annotated[EncryptorContext, Depends(context)]) -> Session:
    """The request's session, or LoginRequired (answered with the sign-in page)."""
    claims, token = session_claims(request, ctx.user_token_secret, ctx.settings.tenant)
    return Session(claims, token, csrf_token(ctx.user_token_secret, token))


Ctx = Annotated[EncryptorContext, Depends(context)]
User = Annotated[Session, Depends(session)]
State = Annotated[WebState, Depends(_state)]


def _secure(request: Request, ctx: EncryptorContext) -> bool:
    configured = ctx.settings.ui_secure_cookie
    return request.url.scheme == "https" if configured is None else configured


def _page(request: Request, name: str, status: int = 200, **values: object) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, values, status_code=status)
    response.headers.update(PAGE_HEADERS)
    return response


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers=PAGE_HEADERS)


def sources_of(ctx: EncryptorContext) -> list[Source]:
    """The collections the page searches (``ui_collections``: names or owner/collection)."""
    sources = []
    for entry in ctx.settings.ui_collections:
        owner, _, collection = entry.rpartition("/")
        sources.append(Source(owner or ctx.settings.tenant, collection))
    return sources


def _studies(ctx: EncryptorContext, limit: int = 500) -> list[dict[str, object]]:
    """This hospital's stored studies, newest first, from its own upload records."""
    seen, studies = set(), []
    own = {s.collection for s in sources_of(ctx) if s.owner == ctx.settings.tenant}
    for record in reversed(ctx.encryptor.audit.read(actions={"upload"})):
        key = (record.get("collection"), record.get("image_id"))
        if key in seen or key[0] not in own or not record.get("image_id"):
            continue
        seen.add(key)
        label = record.get("label")
        studies.append(
            {
                "collection": key[0],
                "image_id": key[1],
                "class": CLASS_NAMES.get(label, "") if isinstance(label, int) else "",
                "mode": record.get("mode", ""),
                "role": record.get("role", ""),
                "at": time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(record.get("at", 0)))),
            }
        )
        if len(studies) >= limit:
            break
    return studies


def _home(
    request: Request,
    ctx: EncryptorContext,
    user: Session,
    *,
    result: QueryResult | None = None,
    error: str = "",
    status: int = 200,
    form: dict[str, object] | None = None,
) -> HTMLResponse:
    sources = sources_of(ctx)
    hospitals = sorted({s.owner for s in sources})
    form = form or (
        dict(result.filters) if result else {"k": 10, "class": None, "hospitals": hospitals}
    )
    return _page(
        request,
        "home.html",
        status,
        user=user,
        tenant=ctx.settings.tenant,
        sources=sources,
        hospitals=hospitals,
        classes=CLASS_NAMES,
        studies=_studies(ctx),
        result=result,
        error=error,
        form=form,
        max_k=MAX_UI_K,
        viewer_url=lambda hit: _viewer_url(ctx, hit),
    )


# -- sign-in ------------------------------------------------------------------------------------
@router.get("/login")
def login_page(request: Request, ctx: Ctx, next: str = UI_PREFIX + "/") -> HTMLResponse:
    """The sign-in form (a fresh double-submit CSRF cookie with it)."""
    return _login(request, ctx, next=next)


def _login(
    request: Request, ctx: EncryptorContext, *, next: str, message: str = "", status: int = 200
) -> HTMLResponse:
    value = new_login_csrf_value()
    response = _page(
        request,
        "login.html",
        status,
        tenant=ctx.settings.tenant,
        next=_safe_next(next),
        message=message,
        csrf=value,
    )
    set_login_csrf(response, value, _secure(request, ctx))
    return response


def _safe_next(next: str) -> str:
    """Only a path of these pages: no open redirect to another site."""
    if not next.startswith(UI_PREFIX + "/") or next.startswith("//") or "\\" in next:
        return UI_PREFIX + "/"
    return next


@router.post("/login")
def login(
    request: Request,
    ctx: Ctx,
    token: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = UI_PREFIX + "/",
) -> Response:
    """Check the user token, start the session, go on to `next`."""
    check_login_csrf(request, csrf)
    audit = ctx.encryptor.audit
    try:
        claims = verify_token(ctx.user_token_secret, token.strip(), kind=ENCRYPTOR_TOKEN)
        if claims.tenant != ctx.settings.tenant:
            raise AuthError(f"a token of tenant {claims.tenant!r}, not of this hospital")
    except AuthError as exc:
        audit.unauthenticated(f"ui sign-in: {exc}")
        return _login(request, ctx, next=next, message=f"Not signed in: {exc}", status=401)
    audit.write(action="ui-login", sub=claims.sub, outcome="ok")
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session(response, token.strip(), int(claims.exp - time.time()), _secure(request, ctx))
    return response


@router.post("/logout")
def logout(request: Request, ctx: Ctx, user: User, csrf: Annotated[str, Form()] = "") -> Response:
    """End the session (CSRF-checked: a page elsewhere cannot sign the user out)."""
    check_csrf(request, ctx.user_token_secret, user.token, csrf)
    ctx.encryptor.audit.write(action="ui-logout", sub=user.claims.sub, outcome="ok")
    response = RedirectResponse(UI_PREFIX + "/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=UI_PREFIX)
    return response


# -- query and result ---------------------------------------------------------------------------
@router.get("/")
def home(request: Request, ctx: Ctx, user: User) -> HTMLResponse:
    """The query form, the hospital's stored studies and the filters."""
    return _home(request, ctx, user)


@router.post("/search")
def search(
    request: Request,
    ctx: Ctx,
    user: User,
    state: State,
    csrf: Annotated[str, Form()] = "",
    query_from: Annotated[str, Form()] = "upload",
    study: Annotated[str, Form()] = "",
    image: Annotated[UploadFile | None, File()] = None,
    mask: Annotated[UploadFile | None, File()] = None,
    k: Annotated[int, Form()] = 10,
    label: Annotated[str, Form(alias="class")] = "",
    hospital: Annotated[list[str] | None, Form()] = None,
) -> Response:
    """Run a query (uploaded slice + mask, or a stored study), then show its result."""
    check_csrf(request, ctx.user_token_secret, user.token, csrf)
    sources = sources_of(ctx)
    chosen = set(hospital or [])
    form = {"k": k, "class": int(label) if label.isdigit() else None, "hospitals": sorted(chosen)}
    try:
        ctx.permit(user.claims, "search")
        require_scope(user.claims, "decrypt")
        if not 1 <= k <= MAX_UI_K:
            raise ValueError(f"k must be between 1 and {MAX_UI_K}, got {k}")
        if label and (not label.isdigit() or int(label) not in CLASS_NAMES):
            raise ValueError(f"unknown class {label!r}")
        selected = [s for s in sources if s.owner in chosen]
        if not selected:
            raise ValueError("choose at least one hospital to search")
        pixels, plain_mask, described, exclude = _query_input(
            ctx, query_from, study, image, mask, user
        )
        result = run_query(
            ctx.encryptor,
            state.peers,
            sub=user.claims.sub,
            pixels=pixels,
            mask=plain_mask,
            described=described,
            sources=selected,
            k=k,
            label=form["class"],
            exclude=exclude,
            budget=lambda: _decrypt_budget(ctx, user),
        )
    except HTTPException as exc:
        if exc.status_code not in (403, 429):
            raise
        return _home(request, ctx, user, error=str(exc.detail), status=exc.status_code, form=form)
    except (ValueError, IntegrityError) as exc:
        return _home(request, ctx, user, error=str(exc), status=422, form=form)
    except GatewayError as exc:
        message = f"the cloud did not answer the search ({exc.status}: {exc.detail})"
        return _home(request, ctx, user, error=message, status=502, form=form)
    state.results.put(result)
    return RedirectResponse(f"{UI_PREFIX}/queries/{result.id}", status_code=303)


def _decrypt_budget(ctx: EncryptorContext, user: Session) -> str | None:
    """None while the user may decrypt one more image; else why not (the API's budget)."""
    try:
        ctx.limiter.check("decrypt", user.claims)
    except HTTPException as exc:
        return f"decryption budget spent ({exc.detail}); run the query again in a moment"
    return None


def _query_input(
    ctx: EncryptorContext,
    query_from: str,
    study: str,
    image: UploadFile | None,
    mask: UploadFile | None,
    user: Session,
) -> tuple[np.ndarray, np.ndarray, str, str | None]:
    """(pixels, mask, description, image id to leave out) of the form's query; ValueError."""
    settings = ctx.settings
    if query_from == "study":
        collection, _, image_id = study.partition(":")
        check_name(collection, "collection")
        check_image_id(image_id)
        opened = _open_study(ctx, collection, image_id, user)
        if opened.mask is None:
            raise ValueError("the stored study has no tumour mask")
        return opened.image, opened.mask, f"stored study {image_id[:8]}… ({collection})", image_id
    if query_from != "upload":
        raise ValueError(f"unknown query source {query_from!r}")
    if image is None or not image.filename:
        raise ValueError("choose an image file (DICOM, PNG or NPY) for the query")
    if mask is None or not mask.filename:
        raise ValueError("choose the query's tumour mask (PNG, NPY or DICOM SEG)")
    limit = settings.max_upload_bytes
    data = read_limited(image, limit=limit, what="image", refuse_empty=False)
    pixels, _ = read_pixels(data, "image", max_pixels=settings.max_pixels)
    mask_data = read_limited(mask, limit=limit, what="mask", refuse_empty=False)
    plain_mask, _ = read_mask(mask_data, max_pixels=settings.max_pixels)
    return pixels, plain_mask, f"upload: {image.filename[:60]}", None


def _open_study(ctx: EncryptorContext, collection: str, image_id: str, user: Session):
    """One of this hospital's stored images, decrypted (scope, budget and outcome audited)."""
    record = {"action": "decrypt", "sub": user.claims.sub, "via": "ui", "image_id": image_id}
    try:
        ctx.permit(user.claims, "decrypt")
    except HTTPException as exc:
        ctx.encryptor.audit.write(**record, outcome="denied", reason=str(exc.detail)[:200])
        raise
    try:
        opened = ctx.encryptor.fetch_plain(collection, image_id)
    except (IntegrityError, GatewayError) as exc:
        ctx.encryptor.audit.write(**record, outcome="refused", reason=str(exc)[:200])
        raise ValueError(f"stored study {image_id} could not be opened: {exc}") from None
    ctx.encryptor.audit.write(**record, outcome="ok")
    return opened


def _result(state: WebState, user: Session, query_id: str) -> QueryResult:
    result = state.results.get(query_id, user.claims.sub)
    if result is None:
        raise HTTPException(404, "no such result (results are kept for the latest queries only)")
    return result


@router.get("/queries/{query_id}")
def result_page(request: Request, ctx: Ctx, user: User, state: State, query_id: str) -> Response:
    """A query's result: the query, the tiles (each opened when the page asks for it), the
    exports (the view is audited, and each tile's view)."""
    result = _result(state, user, query_id)
    ctx.encryptor.audit.write(
        action="ui-view",
        sub=user.claims.sub,
        outcome="ok",
        query=query_id,
        tiles=len(result.hits),
    )
    return _home(request, ctx, user, result=result)


@router.get("/queries/{query_id}/hits/{rank:int}")
def hit_tile(
    request: Request, ctx: Ctx, user: User, state: State, query_id: str, rank: int
) -> HTMLResponse:
    """One tile of a result, opened first if it was not (the page asks for each in turn, so
    the first shows as soon as it is open); its view is audited."""
    result = _result(state, user, query_id)
    hit = _open_tile(result, rank)
    ctx.encryptor.audit.write(
        action="ui-view",
        sub=user.claims.sub,
        outcome=hit.state,
        query=query_id,
        rank=rank,
        owner=hit.source.owner,
        image_id=hit.image_id,
    )
    return _page(
        request,
        "tile.html",
        result=result,
        hit=hit,
        tenant=ctx.settings.tenant,
        viewer_url=lambda h: _viewer_url(ctx, h),
    )


def _open_tile(result: QueryResult, rank: int) -> Hit:
    try:
        return result.open_tile(rank)
    except KeyError:
        raise HTTPException(404, f"no hit {rank}") from None


def _viewer_url(ctx: EncryptorContext, hit: Hit) -> str | None:
    """The DICOMweb viewer's URL of one of this hospital's hits that came as DICOM; None for
    another hospital's (its UIDs never leave it), a non-DICOM one, or no viewer configured."""
    refs = ctx.encryptor.dicom_refs
    if not ctx.settings.viewer_url or refs is None or hit.source.owner != ctx.settings.tenant:
        return None
    ref = refs.get(hit.source.collection, hit.image_id)
    return viewer_link(ctx.settings.viewer_url, hit.source.collection, ref)


@router.get("/queries/{query_id}/query.png")
def query_png(user: User, state: State, query_id: str) -> Response:
    return _png(_result(state, user, query_id).query_png)


@router.get("/queries/{query_id}/query-outline.png")
def query_outline(user: User, state: State, query_id: str) -> Response:
    return _png(_result(state, user, query_id).query_outline)


@router.get("/queries/{query_id}/query-cloud.png")
def query_cloud(user: User, state: State, query_id: str) -> Response:
    image = _result(state, user, query_id).cloud_image()
    if image is None:
        raise HTTPException(404, "the cloud got no image of this query")
    return _png(image)


def _shown_hit(state: WebState, user: Session, query_id: str, rank: int) -> Hit:
    hit = _open_tile(_result(state, user, query_id), rank)
    if hit.state != "shown":
        raise HTTPException(404, f"hit {rank} is not shown: {hit.reason}")
    return hit


@router.get("/queries/{query_id}/hits/{rank}.png")
def hit_png(user: User, state: State, query_id: str, rank: int) -> Response:
    """A hit decrypted (8-bit, as shown)."""
    return _png(_shown_hit(state, user, query_id, rank).png)


@router.get("/queries/{query_id}/hits/{rank}.npy")
def hit_npy(user: User, state: State, query_id: str, rank: int) -> Response:
    """A hit decrypted exactly (its own depth: a sealed image's 12/16 bits)."""
    hit = _shown_hit(state, user, query_id, rank)
    image = hit.exact if hit.exact is not None else decode_image_png(hit.png, "hit")
    buffer = io.BytesIO()
    np.save(buffer, image, allow_pickle=False)
    return Response(buffer.getvalue(), media_type="application/octet-stream", headers=PAGE_HEADERS)


@router.get("/queries/{query_id}/hits/{rank}/outline.png")
def hit_outline(user: User, state: State, query_id: str, rank: int) -> Response:
    return _png(_shown_hit(state, user, query_id, rank).outline)


@router.get("/queries/{query_id}/hits/{rank}/cloud.png")
def hit_cloud(ctx: Ctx, user: User, state: State, query_id: str, rank: int) -> Response:
    """What the cloud stores of a hit: its cipher image (pe), fetched from the gateway."""
    try:
        hit = _result(state, user, query_id).hit(rank)
    except KeyError:
        raise HTTPException(404, f"no hit {rank}") from None
    if hit.mode != "pe":
        raise HTTPException(404, f"a {hit.mode} image is not stored as a viewable image")
    owner = None if hit.source.owner == ctx.settings.tenant else hit.source.owner
    try:
        return _png(ctx.encryptor.gateway.cipher(hit.source.collection, hit.image_id, owner=owner))
    except GatewayError as exc:
        raise HTTPException(502, f"cloud gateway: {exc.detail}") from None


@router.get("/queries/{query_id}/export.{kind}")
def export(ctx: Ctx, user: User, state: State, query_id: str, kind: str) -> Response:
    """The query's export: montage PNG, or the ids and scores as CSV or JSON (audited)."""
    result = _result(state, user, query_id)
    makers = {
        "png": (result.montage_png, "image/png"),
        "csv": (lambda: result.export_csv().encode(), "text/csv"),
        "json": (lambda: result.export_json().encode(), "application/json"),
    }
    if kind not in makers:
        raise HTTPException(404, "exports: png, csv or json")
    make, media = makers[kind]
    result.open_all()  # every tile, as the export lists them all
    ctx.encryptor.audit.write(
        action="ui-export", sub=user.claims.sub, outcome="ok", query=query_id, kind=kind
    )
    headers = {
        **PAGE_HEADERS,
        "content-disposition": f'attachment; filename="pecbir-query-{query_id}.{kind}"',
    }
    return Response(make(), media_type=media, headers=headers)


@router.get("/studies/{collection}/{image_id}.png")
def study_png(ctx: Ctx, user: User, collection: str, image_id: str) -> Response:
    """A stored study of this hospital, decrypted for the preview (audited), outline drawn."""
    try:
        check_name(collection, "collection")
        check_image_id(image_id)
        opened = _open_study(ctx, collection, image_id, user)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    image = Image.open(io.BytesIO(encode_png(shown_uint8(opened.image)))).convert("RGBA")
    outline = Image.open(io.BytesIO(outline_png(opened.mask, np.shape(opened.image))))
    image.alpha_composite(outline.convert("RGBA"))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return _png(buffer.getvalue())


@router.get("/audit")
def audit_page(request: Request, ctx: Ctx, user: User, who: str = "") -> HTMLResponse:
    """Who looked at what: the encryptor's audit log, newest first."""
    records = ctx.encryptor.audit.read(last=2000)
    if who:
        records = [r for r in records if r.get("sub") == who]
    rows = []
    for record in reversed(records[-300:]):
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(record.get("at", 0))))
        details = {k: v for k, v in record.items() if k not in {"at", "action", "sub", "outcome"}}
        rows.append(
            {
                "at": at,
                "action": record.get("action", ""),
                "sub": record.get("sub", ""),
                "outcome": record.get("outcome", ""),
                "details": ", ".join(f"{k}={v}" for k, v in sorted(details.items())),
            }
        )
    return _page(request, "audit.html", user=user, tenant=ctx.settings.tenant, rows=rows, who=who)


def _login_required(request: Request, exc: Exception) -> Response:
    """Pages: the sign-in page (via a redirect that remembers where to go); others: 401."""
    assert isinstance(exc, LoginRequired)
    if request.method in ("GET", "HEAD"):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(
            f"{UI_PREFIX}/login?next={quote(target, safe='/')}", status_code=303
        )
    return JSONResponse({"detail": exc.reason}, status_code=401, headers=PAGE_HEADERS)


def install(app: FastAPI, *, peers: PeerKeys, cache_size: int = 16) -> None:
    """Add the pages to the encryptor's `app`.

    Parameters
    ----------
    app
        The encryptor's application (its `EncryptorContext` already set).
    peers
        Other hospitals' key release.
    cache_size
        Query results kept in memory.
    """
    app.state.web = WebState(ResultCache(cache_size), peers)
    app.include_router(router)
    app.mount(f"{UI_PREFIX}/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.add_exception_handler(LoginRequired, _login_required)

    @app.get(UI_PREFIX, include_in_schema=False)
    def ui_root() -> Response:
        return RedirectResponse(UI_PREFIX + "/", status_code=307)
