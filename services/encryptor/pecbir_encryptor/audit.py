"""The encryptor's audit log: one JSON line per decryption, key release, refusal or STOW.

Each record is appended with O_APPEND and fsync'ed before the request is answered, so a
crash cannot lose the trace of a key that was handed out; the file is created 0600.
"""

from __future__ import annotations

import json
import os
import threading
import time
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

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, **record: object) -> None:
        """Append one record, stamped with the time (``at``, Unix seconds), and fsync it.

        Parameters
        ----------
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
                os.fsync(fd)
            finally:
                os.close(fd)
