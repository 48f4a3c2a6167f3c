"""The cloud gateway: FastAPI app factory. It only ever sees cipher images and masks."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from pecbir_contracts.auth import GATEWAY_TOKEN, check_secret
from pecbir_contracts.routes import GATEWAY_BLOB
from pecbir_contracts.store import ObjectStore
from pecbir_gateway import images, model_versions, ops, protection, sealed, search
from pecbir_gateway.deps import GatewayContext
from pecbir_gateway.dispatch import CeleryDispatcher, TaskDispatcher
from pecbir_gateway.settings import GatewaySettings
from pecbir_platform.config import settings_from_env
from pecbir_platform.heap import freeze_startup_heap
from pecbir_platform.ratelimit import RateLimiter
from pecbir_platform.store import check_put_if_absent
from pecbir_platform.web import (
    MULTIPART_OVERHEAD_BYTES,
    add_healthz,
    add_store_error_handlers,
    document_api,
    guard_requests,
)


def create_app(
    settings: GatewaySettings | None = None,
    *,
    store: ObjectStore | None = None,
    dispatcher: TaskDispatcher | None = None,
    search_client: httpx.Client | None = None,
) -> FastAPI:
    settings = settings or settings_from_env(GatewaySettings)
    secret = check_secret(settings.token_secret.get_secret_value(), "PECBIR_TOKEN_SECRET")
    if store is None:
        store = settings.open_store()
    # Idempotency records and model version numbers rely on it across replicas: refuse to
    # start rather than hand out one version twice.
    check_put_if_absent(store)
    context = GatewayContext(
        settings=settings,
        store=store,
        dispatcher=dispatcher or CeleryDispatcher(settings.broker_url),
        search=search_client
        or httpx.Client(base_url=settings.search_url, timeout=settings.search_timeout_s),
        limiter=RateLimiter.from_settings(settings.rate_limits, settings.rate_limits_url),
        sharing=settings.sharing(),
    )
    app = FastAPI(
        title="pe-cbir gateway",
        version="1",
        description="Encrypted uploads, k-NN search over cipher images, encrypted downloads.",
    )
    app.state.context = context
    app.include_router(images.router)
    app.include_router(search.router)
    app.include_router(model_versions.router)
    app.include_router(sealed.router)
    app.include_router(protection.router)
    add_store_error_handlers(app)
    guard_requests(
        app,
        secret=secret,
        kind=GATEWAY_TOKEN,
        # An upload: cipher and mask, each up to the limit, and the metadata form field.
        max_body_bytes=2 * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        # Capability URLs carry their own signed token.
        public_prefixes=(GATEWAY_BLOB.partition("{")[0],),
    )

    document_api(app)
    add_healthz(
        app,
        secret=lambda: secret,
        kind=GATEWAY_TOKEN,
        details=lambda: {"store": repr(store)},
    )

    ops.instrument(app, context)
    # Last: full collections then walk only what requests allocate (pecbir_platform.heap).
    app.router.add_event_handler("startup", freeze_startup_heap)
    return app
