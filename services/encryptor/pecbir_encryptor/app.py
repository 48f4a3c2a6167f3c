"""The owner-side encryptor: takes plain DICOM/PNG/NPY from a PACS, sends only ciphertext on.

Runs at the hospital and holds the master key. Its users authenticate with bearer tokens of
this service (not the cloud's); key release is audited. This module only assembles the app:
dependencies in `deps`, one router per resource in `routes`, the owner-side operations in
`core`.
"""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from pecbir_contracts.auth import ENCRYPTOR_TOKEN, check_secret
from pecbir_encryptor import ops
from pecbir_encryptor.credentials import PacsCredentials
from pecbir_encryptor.deps import (
    CHALLENGE,
    SECURITY_SCHEMES,
    EncryptorContext,
    authenticator,
    build_encryptor,
)
from pecbir_encryptor.janitor import PendingJanitor
from pecbir_encryptor.keyring import Keyring
from pecbir_encryptor.peers import PeerKeys
from pecbir_encryptor.routes import dicomweb, ingest, keys, patch_model, search
from pecbir_encryptor.settings import EncryptorSettings
from pecbir_encryptor.web import UI_PREFIX
from pecbir_encryptor.web import install as install_pages
from pecbir_platform.config import settings_from_env
from pecbir_platform.heap import freeze_startup_heap
from pecbir_platform.ratelimit import RateLimiter
from pecbir_platform.web import (
    MULTIPART_OVERHEAD_BYTES,
    add_healthz,
    add_reason_headers,
    document_api,
    guard_requests,
)
from pecore.keys import MasterKey


def create_app(
    settings: EncryptorSettings | None = None,
    *,
    master: MasterKey | Keyring | None = None,
    gateway_client: httpx.Client | None = None,
) -> FastAPI:
    """The encryptor's FastAPI application.

    Parameters
    ----------
    settings
        The service's settings; read from ``PECBIR_ENCRYPTOR_*`` variables when omitted.
    master
        A master key or keyring instead of the key files named in `settings`.
    gateway_client
        An HTTP client of the cloud gateway instead of one for ``settings.gateway_url``.

    Returns
    -------
    FastAPI
        The application (routes, readiness checks and metrics installed).
    """
    settings = settings or settings_from_env(EncryptorSettings)
    secret = check_secret(
        settings.user_token_secret.get_secret_value(), "PECBIR_ENCRYPTOR_USER_TOKEN_SECRET"
    )
    encryptor = build_encryptor(settings, master=master, gateway_client=gateway_client)
    app = FastAPI(
        title="pe-cbir encryptor (owner side)",
        version="1",
        description="Plain images in, cipher images to the cloud; decryption for key holders.",
    )
    credentials = (
        PacsCredentials(settings.pacs_credentials, settings.tenant)
        if settings.pacs_credentials is not None
        else None
    )
    authenticate = authenticator(secret, credentials)
    app.state.context = EncryptorContext(
        settings=settings,
        encryptor=encryptor,
        limiter=RateLimiter.from_settings(settings.rate_limits, settings.rate_limits_url),
        authenticate=authenticate,
    )
    # Also on its own: tests and the CLI reach the owner-side operations of a running app.
    app.state.encryptor = encryptor
    # Expiry of waiting halves, cloud retirement of replaced versions: for the app's lifetime.
    janitor = PendingJanitor(encryptor, settings.pending_ttl_s, settings.pending_sweep_interval_s)
    app.state.janitor = janitor
    sweeping: list[asyncio.Task] = []

    async def start_sweeping() -> None:
        if not sweeping:  # once, though an app may be started twice (a test client, uvicorn)
            sweeping.append(asyncio.get_running_loop().create_task(janitor.run()))

    async def stop_sweeping() -> None:
        for task in sweeping:
            task.cancel()
        sweeping.clear()

    app.router.add_event_handler("startup", start_sweeping)
    app.router.add_event_handler("shutdown", stop_sweeping)
    for router in (ingest.router, dicomweb.router, search.router, keys.router, patch_model.router):
        app.include_router(router)
    # The radiologist's pages (/ui): their own sign-in (session cookie + CSRF token).
    install_pages(app, peers=PeerKeys.from_settings(settings.peers, settings.gateway_timeout_s))
    guard_requests(
        app,
        secret=secret,
        kind=ENCRYPTOR_TOKEN,
        # An image and its mask, each up to the limit (a STOW body has the limit for itself).
        max_body_bytes=2 * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        on_unauthenticated=encryptor.audit.unauthenticated,
        authenticate=authenticate,
        challenge=CHALLENGE,
        # STOW-RS bodies are spooled to disk (routes.dicomweb): their own limit.
        body_limits=(("/dicomweb/", settings.max_stow_bytes),),
        session_prefixes=(UI_PREFIX,),
    )

    document_api(app, security_schemes=SECURITY_SCHEMES)
    # A PACS logs status and headers (Orthanc with HttpVerbose), not our JSON: the reason too.
    add_reason_headers(app)
    add_healthz(
        app,
        secret=lambda: secret,
        kind=ENCRYPTOR_TOKEN,
        details=lambda: {
            "tenant": settings.tenant,
            "key_id": encryptor.master.key_id,
            "pending": janitor.status(),
        },
    )

    ops.instrument(app, encryptor)
    if settings.dimse_port is not None:
        _serve_dimse(app, encryptor, settings)
    # Last: full collections then walk only what requests allocate (pecbir_platform.heap).
    app.router.add_event_handler("startup", freeze_startup_heap)
    return app


def _serve_dimse(app: FastAPI, encryptor, settings: EncryptorSettings) -> None:
    """Run the DIMSE C-STORE SCP beside the HTTP app, for the app's lifetime."""
    from pecbir_encryptor.dimse import DimseConfig, start_scp

    config = DimseConfig(
        port=settings.dimse_port,
        host=settings.dimse_host,
        ae_title=settings.dimse_ae_title,
        allowed=settings.dimse_allowed_aes,
        collection=settings.dimse_collection,
        collections=settings.dimse_ae_collections,
        max_associations=settings.dimse_max_associations,
        tls_cert=settings.dimse_tls_cert,
        tls_key=settings.dimse_tls_key,
        tls_ca=settings.dimse_tls_ca,
    )
    servers = []
    app.router.add_event_handler(
        "startup",
        lambda: servers.append(start_scp(encryptor, config, max_pixels=settings.max_pixels)),
    )
    app.router.add_event_handler("shutdown", lambda: [s.shutdown() for s in servers])
