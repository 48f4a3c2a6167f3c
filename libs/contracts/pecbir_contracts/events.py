"""The event stream between indexer and search: new vectors and new model versions.

The event models and the bus interface; the back ends (a Redis stream `EVENT_STREAM` in
service deployments, an in-process list for the embedded demo and unit tests) live in
`pecbir_platform.bus`. The stream is a fast path only: every vector is
also stored in the object store, from which the search service catches up after a restart.
"""

from __future__ import annotations

from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from pecbir_contracts.request_ids import current_request_id

__all__ = [
    "AnyEvent",
    "Event",
    "EventBus",
    "IndexFailedEvent",
    "ModelEvent",
    "RetireEvent",
    "VectorEvent",
    "decode_event",
    "encode_event",
]


class VectorEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["vector"] = "vector"
    tenant: str
    collection: str
    version: str
    image_id: str
    label: int | None = None
    vector: list[float]
    # Request that caused the event (observability only; see pecbir_platform.observability).
    request_id: str | None = None


class ModelEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["model"] = "model"
    tenant: str
    collection: str
    version: str
    request_id: str | None = None


class RetireEvent(BaseModel):
    """The owner retired an image (a corrected version replaced it): drop its vector from
    every version, and ignore any vector of it that comes later."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["retire"] = "retire"
    tenant: str
    collection: str
    image_id: str
    request_id: str | None = None


class IndexFailedEvent(BaseModel):
    """Indexing `image_id` with `version` failed for good (its failure record is in the store,
    `CollectionLayout.version_failure`): a search service filling `version` stops waiting for
    it, so the swap to `version` proceeds without that image."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["index_failed"] = "index_failed"
    tenant: str
    collection: str
    version: str
    image_id: str
    request_id: str | None = None


AnyEvent = VectorEvent | ModelEvent | RetireEvent | IndexFailedEvent
Event = Annotated[AnyEvent, Field(discriminator="kind")]
_EVENT = TypeAdapter(Event)


def encode_event(event: AnyEvent) -> str:
    """JSON of `event`, stamped with the current request id unless it names one already."""
    if event.request_id is None:
        request_id = current_request_id()
        if request_id:
            event = event.model_copy(update={"request_id": request_id})
    return event.model_dump_json()


def decode_event(data: str | bytes) -> AnyEvent:
    return _EVENT.validate_json(data)


class EventBus(Protocol):
    def publish(self, event: AnyEvent) -> str: ...

    def last_id(self) -> str:
        """Id of the newest event ("0-0" if none): read after it to see only new events."""

    def read(
        self, after: str, block_ms: int = 1000, count: int = 1000
    ) -> list[tuple[str, AnyEvent]]: ...

    def incr_attempts(self, task_id: str) -> int:
        """Count one more delivery of a task (poison-message detection)."""

    def clear_attempts(self, task_id: str) -> None: ...
