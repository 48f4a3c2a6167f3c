"""Operations hooks of the encryptor: metrics, request ids and readiness checks.

Readiness does not include the cloud gateway: while the cloud is away the encryptor still
answers (decryption of images already held, clear 502s for uploads) instead of vanishing.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from pecbir_encryptor.core import Encryptor
from pecbir_platform.observability import Check, httpx_request_id_hook, instrument_app


def readiness_checks(encryptor: Encryptor) -> dict[str, Check]:
    def master_key() -> bool:
        return bool(encryptor.master.key_id)

    def audit_log() -> bool:
        if encryptor.audit.path is None:
            return True
        folder = encryptor.audit.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"audit log folder {folder} is not writable")
        return True

    return {"master_key": master_key, "audit_log": audit_log}


def instrument(app: FastAPI, encryptor: Encryptor) -> None:
    http = encryptor.gateway.http
    hooks = http.event_hooks
    if httpx_request_id_hook not in hooks.get("request", []):
        http.event_hooks = {
            **hooks,
            "request": [*hooks.get("request", []), httpx_request_id_hook],
        }
    instrument_app(app, "encryptor", readiness_checks(encryptor))
