"""The request id that follows one call across services: HTTP header, Celery message header,
event field, and the context variable that holds it inside a process."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar, Token

__all__ = [
    "REQUEST_ID_FIELD",
    "REQUEST_ID_HEADER",
    "clean_request_id",
    "current_request_id",
    "new_request_id",
    "request_context",
    "reset_request_id",
    "set_request_id",
]

REQUEST_ID_HEADER = "X-Request-ID"
# Celery message header and event field that carry the id between processes.
REQUEST_ID_FIELD = "pecbir_request_id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")

_request_id: ContextVar[str | None] = ContextVar("pecbir_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def clean_request_id(value: str | None) -> str | None:
    """A caller-supplied id if it looks like one (bounded, no control characters), else None."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return None


def current_request_id() -> str | None:
    return _request_id.get()


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[str]:
    """Run a block under `request_id` (a fresh one if None or malformed)."""
    rid = clean_request_id(request_id) or new_request_id()
    token = _request_id.set(rid)
    try:
        yield rid
    finally:
        _request_id.reset(token)


def set_request_id(request_id: str) -> Token[str | None]:
    """Bind `request_id` until `reset_request_id(token)` (a Celery task's prerun/postrun)."""
    return _request_id.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    _request_id.reset(token)
