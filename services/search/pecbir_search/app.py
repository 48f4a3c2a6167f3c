"""The search service: learned metric + projected vectors in memory, k-NN over HTTP.

This module only assembles the app: dependencies in `deps`, the API in `routes`, the
per-collection state in `engine`, the vector index in `index`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pecbir_contracts.auth import SEARCH_TOKEN, check_secret
from pecbir_contracts.events import EventBus
from pecbir_contracts.store import ObjectStore
from pecbir_platform.bus import bus_from_url
from pecbir_platform.config import settings_from_env
from pecbir_platform.heap import freeze_startup_heap
from pecbir_platform.web import add_healthz, document_api, guard_requests
from pecbir_search import ops, routes
from pecbir_search.engine import SearchEngine
from pecbir_search.settings import SearchSettings


def create_app(
    settings: SearchSettings | None = None,
    *,
    store: ObjectStore | None = None,
    bus: EventBus | None = None,
    start: bool = True,
) -> FastAPI:
    """The search service's FastAPI application.

    Parameters
    ----------
    settings
        The service's settings; read from ``PECBIR_*`` variables when omitted.
    store
        The object store instead of the one named in `settings`.
    bus
        The event stream instead of the one named in `settings` (used when following).
    start
        Catch up from the store and follow the events when the app starts (off in tests that
        drive the engine themselves).

    Returns
    -------
    FastAPI
        The application (routes, readiness checks and metrics installed).
    """
    settings = settings or settings_from_env(SearchSettings)
    secret = check_secret(settings.token_secret.get_secret_value(), "PECBIR_TOKEN_SECRET")
    if store is None:
        store = settings.open_store()
    if bus is None and settings.follow:
        bus = bus_from_url(settings.events_url or settings.broker_url)
    engine = SearchEngine(store, bus if settings.follow else None, settings.encode_threads)
    sys.setswitchinterval(settings.gil_switch_interval_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if start:
            engine.start()
        freeze_startup_heap()  # the caught-up index too (pecbir_platform.heap)
        yield
        engine.stop()

    app = FastAPI(title="pe-cbir search", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.include_router(routes.router)
    guard_requests(app, secret=secret, kind=SEARCH_TOKEN, max_body_bytes=settings.max_body_bytes)

    document_api(app)
    add_healthz(
        app,
        secret=lambda: secret,
        kind=SEARCH_TOKEN,
        details=lambda: {"events_applied": engine.events_applied},
    )

    ops.instrument(app, engine, following=settings.follow)
    return app
