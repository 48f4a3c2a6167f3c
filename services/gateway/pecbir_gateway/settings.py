"""Gateway settings, from the environment (prefix PECBIR_)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from pecbir_platform.store import StoreSettings


class GatewaySettings(StoreSettings):
    model_config = SettingsConfigDict(env_prefix="PECBIR_", extra="ignore")

    token_secret: SecretStr = Field(description="HMAC secret of the cloud's bearer tokens")
    search_url: str = "http://127.0.0.1:8002"
    broker_url: str = "redis://127.0.0.1:6379/0"
    max_upload_bytes: int = 16 * 1024 * 1024
    # Twice an MRI slice's side (512²) and then some; an upload costs at most ~10x a normal
    # one (results/security/edges.md); 2048² cost 12x.
    max_pixels: int = 1024 * 1024
    # A search query's image and tumour ROI: a query costs at most a bounded multiple of a
    # normal one (512x512 slices; the largest tumour of the reference data set is 25,461 px).
    max_query_pixels: int = 1024 * 1024
    max_query_roi_pixels: int = 64 * 1024
    # Budgets per token, "action=per_s/burst" (a tenant gets 4 tokens' worth; 429 +
    # Retry-After beyond); buckets in the Redis at rate_limits_url, shared by all replicas,
    # or in this process when it is unset (embedded mode).
    rate_limits: str = "search=10/40,upload=20/200,train=0.2/5"
    rate_limits_url: str | None = None
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
