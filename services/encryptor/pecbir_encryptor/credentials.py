"""Long-lived credentials for machines at the hospital: a PACS pushing to the encryptor.

A PACS (Orthanc, a vendor archive) holds a fixed header or a user name and password in its
configuration; it cannot mint short-lived tokens. Such a machine gets a PACS account with an
API key: ``pcb.<key id>.<secret>`` (256 random bits), shown once when it is created. The
encryptor keeps only the key's SHA-256 (the secret is random and long, so a slow password hash
would add nothing but latency on every request) with its account, scopes and state, in one
JSON file (0600, replaced atomically; `PECBIR_ENCRYPTOR_PACS_CREDENTIALS`).

The PACS presents it as ``X-API-Key: <key>``, as ``Authorization: Bearer <key>``, or, where
it can do nothing else, as HTTP basic ``<account>:<key>`` (Orthanc's ``Username``/``Password``
of a DICOMweb server). It then acts as ``pacs:<account>`` of the encryptor's tenant with the
account's scopes (by default ``upload`` only). An account may hold several keys at once:
rotation without downtime is create the new key, configure the PACS, revoke the old one.
Revocation is immediate: the file is re-read when it changes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pecbir_contracts.auth import SCOPES, AuthError, Claims

__all__ = ["API_KEY_PREFIX", "PacsCredentials", "PacsKey", "looks_like_api_key"]

API_KEY_PREFIX = "pcb."
_KEY = re.compile(r"^pcb\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
_ACCOUNT = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Scopes a machine may hold: pushing, and reading back what it pushed (WADO-RS).
PACS_SCOPES = frozenset({"upload", "read"})
# Claims need an expiry; a PACS key has none but its revocation.
_NO_EXPIRY = 2**31 - 1


def looks_like_api_key(value: str) -> bool:
    """Whether `value` has the form of a PACS API key (not whether it is valid).

    Parameters
    ----------
    value
        A header value.
    """
    return value.startswith(API_KEY_PREFIX)


@dataclass(frozen=True)
class PacsKey:
    """One API key of a PACS account, as stored (no secret).

    Attributes
    ----------
    key_id
        The key's public id (in the key itself, and in the audit log).
    account
        The PACS account it belongs to.
    scopes
        What it may do.
    created, revoked
        Unix times; `revoked` None while the key is valid.
    """

    key_id: str
    account: str
    scopes: tuple[str, ...]
    created: int
    revoked: int | None


class PacsCredentials:
    """The PACS accounts and their keys, in one JSON file.

    Parameters
    ----------
    path
        The file (created 0600 on the first key).
    tenant
        The tenant every account acts for (the encryptor's).
    """

    def __init__(self, path: Path, tenant: str) -> None:
        self.path = Path(path)
        self.tenant = tenant
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._records: dict[str, dict] = {}

    # -- the file -----------------------------------------------------------------------------
    def _load(self) -> dict[str, dict]:
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                self._stamp, self._records = None, {}
                return {}
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._records = json.loads(self.path.read_text())["keys"]
                self._stamp = stamp
            return self._records

    def _save(self, records: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"version": 1, "keys": records}, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, self.path)

    # -- administration -----------------------------------------------------------------------
    def create(self, account: str, scopes: tuple[str, ...] = ("upload",)) -> tuple[PacsKey, str]:
        """A new key for `account` (created if new): its record and the key, shown once.

        Parameters
        ----------
        account
            Lower-case letters, digits and '-' (at most 63).
        scopes
            Subset of ``upload``, ``read``.

        Raises
        ------
        ValueError
            A bad account name or scope.
        """
        if not _ACCOUNT.match(account):
            raise ValueError(f"account name {account!r}: use a-z, 0-9 and '-' (at most 63)")
        unknown = set(scopes) - PACS_SCOPES
        if unknown or not scopes:
            raise ValueError(f"PACS scopes must be among {sorted(PACS_SCOPES)}, not {scopes}")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        api_key = f"{API_KEY_PREFIX}{key_id}.{secret}"
        record = {
            "account": account,
            "scopes": sorted(set(scopes)),
            "sha256": hashlib.sha256(api_key.encode()).hexdigest(),
            "created": int(time.time()),
            "revoked": None,
        }
        records = dict(self._load())
        records[key_id] = record
        self._save(records)
        return self._key(key_id, record), api_key

    def revoke(self, *, key_id: str | None = None, account: str | None = None) -> list[PacsKey]:
        """Revoke one key, or every key of an account; the keys revoked now.

        Raises
        ------
        ValueError
            No such key or account.
        """
        records = {k: dict(v) for k, v in self._load().items()}
        chosen = [
            k
            for k, v in records.items()
            if (k == key_id or v["account"] == account) and v["revoked"] is None
        ]
        known = key_id in records or any(v["account"] == account for v in records.values())
        if not known:
            raise ValueError(f"no PACS key {key_id!r}" if key_id else f"no account {account!r}")
        now = int(time.time())
        for k in chosen:
            records[k]["revoked"] = now
        self._save(records)
        return [self._key(k, records[k]) for k in chosen]

    def list_keys(self) -> list[PacsKey]:
        """Every key, revoked ones included, oldest first."""
        records = self._load()
        return sorted(
            (self._key(k, v) for k, v in records.items()), key=lambda key: (key.created, key.key_id)
        )

    @staticmethod
    def _key(key_id: str, record: dict) -> PacsKey:
        return PacsKey(
            key_id,
            record["account"],
            tuple(record["scopes"]),
            int(record["created"]),
            record["revoked"],
        )

    # -- authentication -----------------------------------------------------------------------
    def verify(self, api_key: str, account: str | None = None) -> Claims:
        """The claims of a valid, unrevoked API key (of `account`, when one is named).

        Raises
        ------
        AuthError
            Malformed, unknown, revoked, of another account, or a wrong secret.
        """
        match = _KEY.match(api_key.strip())
        if not match:
            raise AuthError("malformed PACS API key")
        key_id = match.group(1)
        record = self._load().get(key_id)
        digest = hashlib.sha256(api_key.strip().encode()).hexdigest()
        # Compared in constant time whether or not the key id exists.
        expected = record["sha256"] if record else "0" * 64
        if not hmac.compare_digest(digest, expected) or record is None:
            raise AuthError("unknown PACS API key")
        if record["revoked"] is not None:
            raise AuthError(f"PACS API key {key_id} was revoked")
        if account is not None and account != record["account"]:
            raise AuthError("the API key belongs to another PACS account")
        scopes = tuple(s for s in record["scopes"] if s in SCOPES)
        return Claims(
            sub=f"pacs:{record['account']}",
            tenant=self.tenant,
            scopes=scopes,
            iat=int(record["created"]),
            exp=_NO_EXPIRY,
            jti=key_id,
        )

    def verify_basic(self, credentials: str) -> Claims:
        """The claims of HTTP basic credentials ``base64(<account>:<API key>)``.

        Raises
        ------
        AuthError
            Not base64 of ``account:key``, or as `verify`.
        """
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError("malformed HTTP basic credentials") from None
        account, sep, api_key = decoded.partition(":")
        if not sep:
            raise AuthError("HTTP basic credentials must be '<PACS account>:<API key>'")
        return self.verify(api_key, account=account)
