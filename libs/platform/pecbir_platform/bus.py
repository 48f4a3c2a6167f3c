"""Event-bus back ends behind `pecbir_contracts.events.EventBus`: a Redis stream
(`RedisBus`, service deployments) and an in-process list (`InMemoryBus`, embedded demo and
unit tests)."""

from __future__ import annotations

import threading
import time

from pecbir_contracts.events import (
    AnyEvent,
    EventBus,
    decode_event,
    encode_event,
)
from pecbir_contracts.tasks import ATTEMPTS_KEY_PREFIX, EVENT_STREAM, EVENT_STREAM_MAXLEN

__all__ = [
    "InMemoryBus",
    "RedisBus",
    "bus_from_url",
]


class InMemoryBus:
    """Single-process stand-in for the Redis stream (embedded demo, unit tests)."""

    def __init__(self) -> None:
        self._events: list[tuple[str, AnyEvent]] = []
        self._attempts: dict[str, int] = {}
        self._changed = threading.Condition()

    def publish(self, event: AnyEvent) -> str:
        with self._changed:
            event_id = f"{len(self._events) + 1}-0"
            self._events.append((event_id, event))
            self._changed.notify_all()
            return event_id

    def last_id(self) -> str:
        with self._changed:
            return self._events[-1][0] if self._events else "0-0"

    def read(
        self, after: str, block_ms: int = 1000, count: int = 1000
    ) -> list[tuple[str, AnyEvent]]:
        start = int(after.split("-")[0])
        deadline = time.monotonic() + block_ms / 1000
        with self._changed:
            while len(self._events) <= start:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._changed.wait(remaining)
            return self._events[start : start + count]

    def incr_attempts(self, task_id: str) -> int:
        with self._changed:
            self._attempts[task_id] = self._attempts.get(task_id, 0) + 1
            return self._attempts[task_id]

    def clear_attempts(self, task_id: str) -> None:
        with self._changed:
            self._attempts.pop(task_id, None)


class RedisBus:
    """The Redis stream `EVENT_STREAM` (capped at about `EVENT_STREAM_MAXLEN` entries)."""

    def __init__(self, url: str, stream: str = EVENT_STREAM) -> None:
        import redis

        self.url = url
        self.stream = stream
        self._redis = redis.Redis.from_url(url)

    def publish(self, event: AnyEvent) -> str:
        event_id = self._redis.xadd(
            self.stream,
            {"event": encode_event(event)},
            maxlen=EVENT_STREAM_MAXLEN,
            approximate=True,
        )
        return event_id.decode() if isinstance(event_id, bytes) else str(event_id)

    def last_id(self) -> str:
        newest = self._redis.xrevrange(self.stream, count=1)
        if not newest:
            return "0-0"
        event_id = newest[0][0]
        return event_id.decode() if isinstance(event_id, bytes) else str(event_id)

    def read(
        self, after: str, block_ms: int = 1000, count: int = 1000
    ) -> list[tuple[str, AnyEvent]]:
        answer = self._redis.xread({self.stream: after}, count=count, block=block_ms)
        events = []
        for _stream, entries in answer or []:
            for event_id, fields in entries:
                raw = fields.get(b"event") or fields.get("event")
                key = event_id.decode() if isinstance(event_id, bytes) else str(event_id)
                events.append((key, decode_event(raw)))
        return events

    def incr_attempts(self, task_id: str) -> int:
        key = ATTEMPTS_KEY_PREFIX + task_id
        pipe = self._redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 7 * 24 * 3600)
        count, _ = pipe.execute()
        return int(count)

    def clear_attempts(self, task_id: str) -> None:
        self._redis.delete(ATTEMPTS_KEY_PREFIX + task_id)


def bus_from_url(url: str | None) -> EventBus:
    if not url or url == "memory://":
        return InMemoryBus()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBus(url)
    raise ValueError(f"unsupported event bus URL {url!r} (use redis://… or memory://)")
