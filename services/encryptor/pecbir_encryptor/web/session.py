"""The page's login: the encryptor's own user tokens, kept in a session cookie, plus CSRF.

A user signs in with a user token of this encryptor (the same kind the API takes as a bearer
token, issued by the hospital); it goes into an HttpOnly, SameSite=Strict cookie scoped to the
pages. Every state-changing request must also carry a CSRF token: a keyed hash of the session
token (so it needs no server-side state and dies with the session), sent as a form field or
an ``X-CSRF-Token`` header. The login form itself is protected by a double-submit cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import HTTPException, Request, Response

from pecbir_contracts.auth import ENCRYPTOR_TOKEN, AuthError, Claims, verify_token

__all__ = [
    "CSRF_HEADER",
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "LoginRequired",
    "check_csrf",
    "check_login_csrf",
    "csrf_token",
    "new_login_csrf_value",
    "session_claims",
    "set_login_csrf",
    "set_session",
]

SESSION_COOKIE = "pecbir_session"
LOGIN_COOKIE = "pecbir_login_csrf"
CSRF_HEADER = "x-csrf-token"
COOKIE_PATH = "/ui"


class LoginRequired(Exception):
    """No valid session: pages answer with the login page, other requests with 401.

    Parameters
    ----------
    reason
        Why the session was not accepted (shown on the login page).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def session_claims(request: Request, secret: bytes, tenant: str) -> tuple[Claims, str]:
    """The claims and token of the request's session cookie.

    Parameters
    ----------
    request
        The incoming request.
    secret
        HMAC secret of this encryptor's user tokens.
    tenant
        The tenant this encryptor serves (a token of another is refused).

    Returns
    -------
    tuple of (Claims, str)
        The verified claims and the raw token.

    Raises
    ------
    LoginRequired
        No cookie, or a token that is forged, expired or of another tenant.
    """
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise LoginRequired("sign in to continue")
    try:
        claims = verify_token(secret, token, kind=ENCRYPTOR_TOKEN)
    except AuthError as exc:
        raise LoginRequired(f"session ended: {exc}") from None
    if claims.tenant != tenant:
        raise LoginRequired(f"this encryptor serves {tenant!r}")
    return claims, token


def csrf_token(secret: bytes, session_token: str) -> str:
    """The CSRF token of a session (keyed hash of its token).

    Parameters
    ----------
    secret
        HMAC secret of this encryptor's user tokens.
    session_token
        The session's user token.

    Returns
    -------
    str
        64 hex digits.
    """
    message = b"pecbir/ui-csrf/v1\x00" + session_token.encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def check_csrf(request: Request, secret: bytes, session_token: str, sent: str | None) -> None:
    """403 unless the request carries its session's CSRF token (form field or header).

    Parameters
    ----------
    request
        The incoming request (its ``X-CSRF-Token`` header is read when `sent` is None).
    secret
        HMAC secret of this encryptor's user tokens.
    session_token
        The session's user token.
    sent
        The ``csrf`` form field, if the request had one.

    Raises
    ------
    HTTPException
        403 when it is missing or wrong.
    """
    sent = sent or request.headers.get(CSRF_HEADER)
    if not sent or not hmac.compare_digest(sent, csrf_token(secret, session_token)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


def check_login_csrf(request: Request, sent: str | None) -> None:
    """403 unless the login form's field matches its double-submit cookie.

    Parameters
    ----------
    request
        The login request.
    sent
        Its ``csrf`` form field.

    Raises
    ------
    HTTPException
        403 when they differ or either is missing.
    """
    cookie = request.cookies.get(LOGIN_COOKIE)
    if not cookie or not sent or not hmac.compare_digest(cookie, sent):
        raise HTTPException(403, "missing or wrong CSRF token: reload the sign-in page")


def set_login_csrf(response: Response, value: str, secure: bool) -> None:
    """Set the login form's double-submit cookie to `value` on `response`.

    Parameters
    ----------
    response
        The sign-in page.
    value
        The value its form carries too (`new_login_csrf_value`).
    secure
        Send it over HTTPS only.
    """
    response.set_cookie(
        LOGIN_COOKIE, value, httponly=True, samesite="strict", secure=secure, path=COOKIE_PATH
    )


def new_login_csrf_value() -> str:
    """A fresh random value for the login form's CSRF field and cookie."""
    return secrets.token_urlsafe(24)


def set_session(response: Response, token: str, max_age_s: int, secure: bool) -> None:
    """Put the session token into its cookie on `response` (and drop the login cookie).

    Parameters
    ----------
    response
        The answer to the sign-in.
    token
        The verified user token.
    max_age_s
        Seconds the cookie lives (no longer than the token).
    secure
        Send it over HTTPS only.
    """
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max(1, max_age_s),
        httponly=True,
        samesite="strict",
        secure=secure,
        path=COOKIE_PATH,
    )
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
