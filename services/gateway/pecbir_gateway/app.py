"""The cloud gateway: FastAPI app factory. It only ever sees cipher images and masks."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from pecbir_contracts.store import ObjectStore
from pecbir_gateway import images, model_versions, ops, search
from pecbir_gateway.deps import GatewayContext
from pecbir_gateway.dispatch import CeleryDispatcher, TaskDispatcher
from pecbir_gateway.settings import GatewaySettings
from pecbir_platform.config import settings_from_env
from pecbir_platform.store import check_put_if_absent
from pecbir_platform.web import add_healthz, add_store_error_handlers, document_api


def create_app(
    settings: GatewaySettings | None = None,
    *,
    store: ObjectStore | None = None,
    dispatcher: TaskDispatcher | None = None,
    search_client: httpx.Client | None = None,
) -> FastAPI:
    settings = settings or settings_from_env(GatewaySettings)
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
    add_store_error_handlers(app)

    document_api(app)
    add_healthz(app, secret=lambda: context.token_secret, details=lambda: {"store": repr(store)})

    ops.instrument(app, context)
    return app
