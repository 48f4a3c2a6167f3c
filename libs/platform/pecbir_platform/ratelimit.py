"""Per-caller budgets: token buckets per tenant and per token, in Redis or in-process.

A bucket holds up to `burst` requests and refills at `per_s` a second; a request takes one,
or is refused with the seconds to wait until one is there (HTTP 429 with ``Retry-After``).
In Redis the check-and-take is one Lua script, run atomically on the server with the server's
clock, so that a budget holds across every replica of a service; the in-process buckets do
the same arithmetic for the embedded mode and for a service run without Redis. While Redis
cannot be reached the budgets are not enforced (an error is logged per request): a restart of
Redis should not take searches down with it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import HTTPException

from pecbir_contracts.auth import Claims

__all__ = [
    "Buckets",
    "Budget",
    "LocalBuckets",
    "RateLimiter",
    "RedisBuckets",
    "parse_budgets",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """A token bucket's shape.

    Attributes
    ----------
    per_s
        Refill rate, requests per second.
    burst
        Capacity: requests accepted at once after a quiet period.
    """

    per_s: float
    burst: int


def parse_budgets(text: str) -> dict[str, Budget]:
    """Budgets from ``"search=5/20,upload=10/40"`` (action=per_s/burst, comma-separated).

    Raises
    ------
    ValueError
        An entry that is not ``action=rate/burst`` with a positive rate and burst.
    """
    budgets: dict[str, Budget] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        action, _, shape = entry.partition("=")
        rate, _, burst = shape.partition("/")
        try:
            budget = Budget(float(rate), int(burst))
        except ValueError:
            raise ValueError(f"bad rate limit {entry!r}: expected 'action=per_s/burst'") from None
        if budget.per_s <= 0 or budget.burst < 1:
            raise ValueError(f"bad rate limit {entry!r}: rate and burst must be positive")
        budgets[action.strip()] = budget
    return budgets


class Buckets(Protocol):
    def take(self, key: str, budget: Budget) -> float:
        """Take one request from bucket `key`: 0.0 if allowed, else the seconds to wait."""
        ...


class LocalBuckets:
    """Token buckets in this process (the embedded mode; a service without Redis)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str, budget: Budget) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, updated = self._state.get(key, (float(budget.burst), now))
            tokens = min(float(budget.burst), tokens + (now - updated) * budget.per_s)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / budget.per_s
            self._state[key] = (tokens - 1 if wait == 0 else tokens, now)
            if len(self._state) > 100_000:  # forget idle buckets (they would be full again)
                idle = [k for k, (_t, at) in self._state.items() if now - at > 3600]
                for stale in idle:
                    del self._state[stale]
        return wait


# KEYS[1]: bucket; ARGV: per_s, burst. Server time, so that replicas agree on the clock.
_TAKE = """
local per_s = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * per_s)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / per_s end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / per_s * 1000) + 1000)
return tostring(wait)
"""


class RedisBuckets:
    """Token buckets in Redis (one Lua script per request), shared by all replicas.

    Parameters
    ----------
    url
        The Redis URL (``redis://[:password@]host:port/db``).
    prefix
        Prefix of the bucket keys.
    """

    def __init__(self, url: str, prefix: str = "pecbir:ratelimit:") -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._script = self._client.register_script(_TAKE)
        self._prefix = prefix

    def take(self, key: str, budget: Budget) -> float:
        return float(self._script(keys=[self._prefix + key], args=[budget.per_s, budget.burst]))


class RateLimiter:
    """The budgets of one service: each action per token and per tenant.

    Parameters
    ----------
    budgets
        Budget of each limited action, for one token; actions not named are not limited.
    buckets
        Where the buckets live (`RedisBuckets`, or `LocalBuckets`).
    tenant_multiple
        A tenant's budget is this many tokens' worth (several users, one hospital).
    """

    def __init__(
        self, budgets: Mapping[str, Budget], buckets: Buckets, *, tenant_multiple: int = 4
    ) -> None:
        self.budgets = dict(budgets)
        self.buckets = buckets
        self.tenant_multiple = tenant_multiple

    @classmethod
    def from_settings(cls, budgets: str, url: str | None) -> RateLimiter:
        """Budgets from their text form; buckets in Redis at `url`, or in-process when None."""
        buckets: Buckets = RedisBuckets(url) if url else LocalBuckets()
        return cls(parse_budgets(budgets), buckets)

    def check(self, action: str, claims: Claims) -> None:
        """Take one `action` request from the caller's token's and tenant's buckets.

        Raises
        ------
        HTTPException
            429 with ``Retry-After`` (whole seconds, at least 1) when either is empty.
        """
        budget = self.budgets.get(action)
        if budget is None:
            return
        token_id = hashlib.sha256(f"{claims.tenant}\0{claims.sub}\0{claims.iat}".encode())
        tenant_budget = Budget(
            budget.per_s * self.tenant_multiple, budget.burst * self.tenant_multiple
        )
        try:
            wait = max(
                self.buckets.take(f"{action}:token:{token_id.hexdigest()[:32]}", budget),
                self.buckets.take(f"{action}:tenant:{claims.tenant}", tenant_budget),
            )
        except Exception as exc:  # Redis unreachable: serve (logged) rather than refuse all
            log.error("rate limits not enforced, bucket store failed: %s", exc)
            return
        if wait > 0:
            raise HTTPException(
                429,
                f"rate limit of {action!r} exceeded ({budget.per_s:g}/s, burst {budget.burst} "
                "per token); retry later",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def __repr__(self) -> str:
        shown: dict[str, Any] = {a: (b.per_s, b.burst) for a, b in self.budgets.items()}
        return f"RateLimiter({shown}, {type(self.buckets).__name__})"
