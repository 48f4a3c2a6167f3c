"""Search-service settings, from the environment (prefix PECBIR_)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from pecbir_platform.store import StoreSettings


class SearchSettings(StoreSettings):
    model_config = SettingsConfigDict(env_prefix="PECBIR_", extra="ignore")

    token_secret: SecretStr = Field(description="HMAC secret of the cloud's bearer tokens")
    # A query from the gateway: cipher and mask PNGs (each at most the gateway's upload limit).
    max_body_bytes: int = 2 * 16 * 1024 * 1024 + 64 * 1024
    events_url: str | None = None
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Follow the event stream in a background thread (off: only catch-up from the store).
    follow: bool = True
    encode_threads: int | None = 1
    # GIL switch interval of the service process: numpy releases the GIL inside a k-NN step,
    # and with Python's default (5 ms) getting it back can cost up to that much.
    gil_switch_interval_s: float = 0.0005
