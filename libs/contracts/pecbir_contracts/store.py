"""The object-store interface every service codes against, and its errors.

Back ends (filesystem, S3/MinIO) live in `pecbir_platform.store`. They raise `ObjectNotFound`
for a missing key and `StorageError` for anything transient, so that callers can retry the
latter and never the former.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Protocol, runtime_checkable

__all__ = [
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "UnsupportedStore",
    "check_key",
]


class StorageError(RuntimeError):
    """The store could not complete an operation (network, disk, permissions): retryable."""


class UnsupportedStore(RuntimeError):
    """The store lacks a guarantee the services rely on: configuration, not transient."""


class ObjectNotFound(KeyError):
    """No object under this key."""

    def __str__(self) -> str:
        return f"no object {self.args[0]!r}"


@runtime_checkable
class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store `data` durably; returns only once the store confirmed the write."""

    def put_if_absent(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        """Store unless the key exists; True if this call created it.

        Atomic across processes and hosts: of concurrent calls on one key exactly one
        returns True. After a StorageError the key may or may not have been created.
        """

    def get(self, key: str) -> bytes: ...

    def iter_chunks(self, key: str, chunk_size: int = 1 << 16) -> Iterator[bytes]: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> list[str]:
        """All keys under `prefix`, sorted."""

    def presigned_get_url(self, key: str, expires: timedelta) -> str | None:
        """A time-limited direct download URL, or None if the back end cannot make one."""


def check_key(key: str) -> str:
    """`key` if it is a relative path without empty, `.` or `..` parts, else ValueError."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key
