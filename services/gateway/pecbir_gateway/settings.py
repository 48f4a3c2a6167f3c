"""Gateway settings, from the environment (prefix PECBIR_)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PECBIR_", extra="ignore")

    store_url: str = Field(
        default="file://./var/store",
        description="file:///path (embedded) or http(s)://host:port of an S3/MinIO endpoint",
    )
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_bucket: str = "pecbir"
    s3_region: str = "us-east-1"
    token_secret: SecretStr = Field(description="HMAC secret of the cloud's bearer tokens")
    search_url: str = "http://127.0.0.1:8002"
    broker_url: str = "redis://127.0.0.1:6379/0"
    max_upload_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 2048 * 2048
    presign_ttl_s: int = 900
    search_timeout_s: float = 30.0
    # "owner/collection=tenant1,tenant2;owner2/coll2=tenant3": who may search/read whose data.
    shared_collections: str = ""

    def sharing(self) -> dict[tuple[str, str], frozenset[str]]:
        table: dict[tuple[str, str], frozenset[str]] = {}
        for entry in filter(None, (e.strip() for e in self.shared_collections.split(";"))):
            target, _, readers = entry.partition("=")
            owner, _, collection = target.strip().partition("/")
            if not owner or not collection or not readers:
                raise ValueError(
                    f"bad PECBIR_SHARED_COLLECTIONS entry {entry!r}: "
                    "expected 'owner/collection=tenant1,tenant2'"
                )
            table[(owner, collection)] = frozenset(r.strip() for r in readers.split(",") if r)
        return table
