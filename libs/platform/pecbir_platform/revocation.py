"""Revoked bearer tokens: a file of token ids and subjects that every service checks.

A signed token is valid until it expires; revoking one early needs state. The state is one
JSON-lines file, named by ``PECBIR_REVOKED_TOKENS`` in each service's environment (the same
file, or a copy, where several services accept the same kind), appended to by
``pecbir token revoke``. Each line revokes one token id (``{"jti": ...}``) or every token a
subject of a tenant was issued up to a time (``{"tenant": ..., "sub": ..., "before": unix}``:
a leaked credential's holder gets new tokens, minted after it). The file is re-read when its
modification time changes, so a revocation takes effect on the next request without a
restart; an unset variable means no revocations.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from pecbir_contracts.auth import AuthError, Claims

__all__ = ["REVOCATIONS_ENV", "RevocationList", "check_not_revoked", "revoke"]

REVOCATIONS_ENV = "PECBIR_REVOKED_TOKENS"


class RevocationList:
    """The revocations in one file (re-read when it changes).

    Parameters
    ----------
    path
        The JSON-lines file (a missing file: nothing revoked).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._ids: frozenset[str] = frozenset()
        self._subjects: dict[tuple[str, str], int] = {}

    def _load(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._ids, self._subjects = None, frozenset(), {}
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        ids: set[str] = set()
        subjects: dict[tuple[str, str], int] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if "jti" in entry:
                    ids.add(str(entry["jti"]))
                else:
                    key = (str(entry["tenant"]), str(entry["sub"]))
                    subjects[key] = max(subjects.get(key, 0), int(entry["before"]))
            except (ValueError, KeyError, TypeError) as exc:
                # A revocation list that cannot be read must not fail open.
                raise AuthError(
                    f"revocation list {self.path} line {number} unreadable: {exc}"
                ) from None
        self._stamp, self._ids, self._subjects = stamp, frozenset(ids), subjects

    def check(self, claims: Claims) -> None:
        """Raise `AuthError` if `claims` belong to a revoked token.

        Parameters
        ----------
        claims
            A token's verified claims.
        """
        with self._lock:
            self._load()
            ids, subjects = self._ids, self._subjects
        if claims.jti is not None and claims.jti in ids:
            raise AuthError("token revoked")
        before = subjects.get((claims.tenant, claims.sub))
        if before is not None and claims.iat <= before:
            raise AuthError(f"tokens of {claims.sub!r} issued before {before} are revoked")


_LISTS: dict[str, RevocationList] = {}
_LISTS_LOCK = threading.Lock()


def check_not_revoked(claims: Claims) -> None:
    """Raise `AuthError` if the file named by ``PECBIR_REVOKED_TOKENS`` revokes `claims`.

    Parameters
    ----------
    claims
        A token's verified claims.
    """
    path = os.environ.get(REVOCATIONS_ENV)
    if not path:
        return
    with _LISTS_LOCK:
        revocations = _LISTS.setdefault(path, RevocationList(Path(path)))
    revocations.check(claims)


def revoke(
    path: Path,
    *,
    jti: str | None = None,
    tenant: str | None = None,
    sub: str | None = None,
    before: int | None = None,
) -> dict[str, object]:
    """Append one revocation to the file at `path` (fsync'ed); the entry written.

    Parameters
    ----------
    path
        The revocation list (created 0600 if missing).
    jti
        A token id to revoke, or:
    tenant, sub, before
        Every token of `sub` of `tenant` issued at or before `before` (default: now).

    Raises
    ------
    ValueError
        Neither a token id nor a tenant and subject.
    """
    if jti:
        entry: dict[str, object] = {"jti": jti}
    elif tenant and sub:
        entry = {"tenant": tenant, "sub": sub, "before": int(before or time.time())}
    else:
        raise ValueError("revoke a token id (jti), or a tenant and subject")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return entry
