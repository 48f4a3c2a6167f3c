"""The owner-side encryptor: takes plain DICOM/PNG/NPY from a PACS, sends only ciphertext on.

Runs at the hospital and holds the master key. Its users authenticate with bearer tokens of
this service (not the cloud's); key release is audited. This module only assembles the app:
dependencies in `deps`, one router per resource in `routes`, the owner-side operations in
`core`.
"""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from pecbir_encryptor import ops
from pecbir_encryptor.deps import EncryptorContext, build_encryptor
from pecbir_encryptor.keyring import Keyring
from pecbir_encryptor.routes import dicomweb, ingest, keys, search
from pecbir_encryptor.settings import EncryptorSettings
from pecbir_platform.config import settings_from_env
from pecbir_platform.web import add_healthz, document_api
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
    encryptor = build_encryptor(settings, master=master, gateway_client=gateway_client)
    app = FastAPI(
        title="pe-cbir encryptor (owner side)",
        version="1",
        description="Plain images in, cipher images to the cloud; decryption for key holders.",
    )
    app.state.context = EncryptorContext(settings=settings, encryptor=encryptor)
    # Also on its own: tests and the CLI reach the owner-side operations of a running app.
    app.state.encryptor = encryptor
    for router in (ingest.router, dicomweb.router, search.router, keys.router):
        app.include_router(router)

    document_api(app)
    add_healthz(
        app,
        secret=lambda: settings.user_token_secret.get_secret_value().encode(),
        details=lambda: {"tenant": settings.tenant, "key_id": encryptor.master.key_id},
    )

    ops.instrument(app, encryptor)
    return app
