"""The encryptor's audit log: one JSON line per upload, decryption, key release, refusal,
STOW or page view.

Each record is appended with O_APPEND and fsync'ed before the request is answered, so a
crash cannot lose the trace of a key that was handed out; the file is created 0600. Requests
refused before authentication are aggregated (`unauthenticated`): an anonymous client cannot
make the log grow, or the disk sync, faster than one line per interval.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Collection
from pathlib import Path

__all__ = ["AuditLog"]


class AuditLog:
    """Append-only JSON-lines audit trail (or nothing, when no path is configured).

    Parameters
    ----------
    path
        The log file; ``None`` turns auditing off (unit tests, benchmarks).

    Attributes
    ----------
    path
        The log file, or ``None``.
    """

    def __init__(self, path: Path | None, *, anonymous_interval_s: float = 10.0) -> None:
        self.path = path
        self.anonymous_interval_s = anonymous_interval_s
        self._lock = threading.Lock()
        self._anonymous_count = 0
        self._anonymous_line_at = -float("inf")
        # per action filter: (bytes of the file parsed so far, the records kept from them), so
        # that a page reading the uploads on every render parses only what was appended since
        # (the log grows by k lines per result view; reading it whole grew with every view)
        # (a replaced log — another inode — is read again from its start)
        self._followed: dict[frozenset[str], tuple[tuple[int, int], int, list[dict]]] = {}

    def unauthenticated(self, reason: str) -> None:
        """Count a request refused for want of a valid token; one line per interval at most.

        The line written (``action="request"``, ``outcome="unauthenticated"``) carries the
        number of refusals since the previous one and the latest reason, never the request's
        path or any other text the client chose.

        Parameters
        ----------
        reason
            Why the token was refused (this service's own message).
        """
        now = time.monotonic()
        with self._lock:
            self._anonymous_count += 1
            if now - self._anonymous_line_at < self.anonymous_interval_s:
                return
            count, self._anonymous_count, self._anonymous_line_at = self._anonymous_count, 0, now
        self.write(
            sync=False,
            action="request",
            outcome="unauthenticated",
            reason=reason[:120],
            count=count,
        )

    def write(self, *, sync: bool = True, **record: object) -> None:
        """Append one record, stamped with the time (``at``, Unix seconds), and fsync it.

        Parameters
        ----------
        sync
            fsync before returning (off only for the counts of anonymous refusals, which
            must cost an anonymous client nothing it could repeat to slow the service).
        **record
            The record's fields (``action``, ``sub``, ``outcome``, ``reason``, ...); values
            that are not JSON types are written as their `str`.
        """
        if self.path is None:
            return
        line = json.dumps({"at": time.time(), **record}, default=str, sort_keys=True)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def read(
        self, *, actions: Collection[str] | None = None, last: int | None = None
    ) -> list[dict]:
        """The records written so far, oldest first (none when auditing is off).

        Parameters
        ----------
        actions
            Keep only records of these actions (all when None).
        last
            Keep only the newest `last` of them.

        Returns
        -------
        list of dict
            The records as written; a torn last line (a crash mid-write) is skipped.
        """
        if self.path is None or not self.path.exists():
            return []
        if actions is None:
            with self._lock:
                data = self.path.read_bytes()
            records = _parse(data, None)
        else:
            key = frozenset(actions)
            with self._lock:
                with self.path.open("rb") as file:
                    stat = os.fstat(file.fileno())
                    inode = (stat.st_dev, stat.st_ino)
                    known, offset, kept = self._followed.get(key, (inode, 0, []))
                    if known != inode or stat.st_size < offset:  # replaced or truncated
                        offset, kept = 0, []
                    file.seek(offset)
                    data = file.read()
                # only whole lines: a line being written is parsed once it is complete
                complete = data.rfind(b"\n") + 1
                kept = kept + _parse(data[:complete], key)
                self._followed[key] = (inode, offset + complete, kept)
            records = list(kept)
        return records[-last:] if last else records


def _parse(data: bytes, actions: Collection[str] | None) -> list[dict]:
    """The JSON records of these lines of the log (of `actions` only, unless None); a torn
    line (a crash mid-write) is skipped."""
    records = []
    for line in data.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if actions is None or record.get("action") in actions:
            records.append(record)
    return records
