"""The owner's signature over its collections' protection, and its peers' check of it.

A hospital that searches another owner's shared collection must send its query in that
collection's form (pe cipher, pe-roi cipher, or a Fisher vector under the owner's patch
model).  The cloud says which (`GET /v1/collections/{c}/protection`), but a cloud that lies
("pe" for a sealed collection) would receive the searcher's query as a pe cipher, and a cloud
that hands over another patch model would get vectors of its choosing.  So the owner signs
what its peers must trust, a `ProtectionRecord` (tenant, collection, mode, pe-roi scheme,
patch-model SHA-256), with an Ed25519 key (the `cryptography` package), and publishes the
signed record through the cloud; a peer checks it against the owner's public key from its own
trust list (`PECBIR_ENCRYPTOR_TRUSTED_OWNERS`) and refuses, with `UntrustedProtection`, a
record that is missing, unsigned, forged, for another collection, or that disagrees with what
the cloud serves.

The signing key is `PECBIR_ENCRYPTOR_SIGNING_KEY` (a file of 32 random bytes, base64, 0600,
made by `pecbir-encryptor signing-key`) or, unset, derived from the active master key (so a
master-key rotation then changes the public key its peers must hold).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pecbir_contracts.schemas import CollectionProtection, ProtectionRecord, SignedProtection
from pecbir_encryptor.gateway_client import GatewayError
from pecore.keys import MasterKey

__all__ = [
    "UntrustedProtection",
    "generate_signing_key",
    "load_signing_key",
    "public_key_b64",
    "sign_protection",
    "signing_key_from_master",
    "verify_protection",
]

_DOMAIN = b"pecbir/protection-record/v1\x00"


class UntrustedProtection(GatewayError):
    """The cloud's word on another owner's collection is not what that owner signed (502)."""

    def __init__(self, detail: str) -> None:
        super().__init__(502, detail)


def _signed_bytes(record: ProtectionRecord) -> bytes:
    body = json.dumps(record.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return _DOMAIN + body.encode()


def signing_key_from_master(master: MasterKey) -> Ed25519PrivateKey:
    """The owner's Ed25519 key derived from its master key (when no signing key file is set)."""
    seed = hmac.new(
        master.secret.get_secret_value(), b"pecbir/owner-signing-key/v1", hashlib.sha256
    ).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Write a fresh signing key (base64 of 32 bytes, 0600); refuses to overwrite a file."""
    seed = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValueError(f"{path} exists: refusing to overwrite a signing key") from None
    try:
        os.write(fd, base64.b64encode(seed) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return Ed25519PrivateKey.from_private_bytes(seed)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in `path` (ValueError naming the file when unreadable)."""
    try:
        seed = base64.b64decode(Path(path).read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{path}: not a signing key (base64 of 32 bytes): {exc}") from None
    if len(seed) != 32:
        raise ValueError(f"{path}: a signing key is 32 bytes, this one is {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The public half, as peers list it in PECBIR_ENCRYPTOR_TRUSTED_OWNERS (base64, 32 bytes)."""
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign_protection(key: Ed25519PrivateKey, record: ProtectionRecord) -> SignedProtection:
    """`record` with the owner's signature."""
    signature = key.sign(_signed_bytes(record))
    return SignedProtection(record=record, signature=base64.b64encode(signature).decode())


def verify_protection(
    held: CollectionProtection,
    *,
    owner: str,
    collection: str,
    trusted: dict[str, str],
) -> ProtectionRecord:
    """The owner's signed record of `owner/collection`, checked; UntrustedProtection otherwise.

    Parameters
    ----------
    held
        The cloud's answer (its mode and the signed record it stores).
    owner, collection
        The collection asked about.
    trusted
        Tenant → base64 Ed25519 public key: the owners this hospital trusts.
    """
    where = f"{owner}/{collection}"
    public = trusted.get(owner)
    if public is None:
        raise UntrustedProtection(
            f"no public key of {owner!r} is configured (PECBIR_ENCRYPTOR_TRUSTED_OWNERS): the "
            f"protection of {where} cannot be checked, so no query is sent to it"
        )
    if held.signed is None:
        raise UntrustedProtection(
            f"the cloud holds no protection record of {where} signed by its owner; refusing "
            "to send a query in the form the cloud names"
        )
    record = held.signed.record
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public, validate=True))
        signature = base64.b64decode(held.signed.signature, validate=True)
        key.verify(signature, _signed_bytes(record))
    except (InvalidSignature, binascii.Error, ValueError):
        raise UntrustedProtection(
            f"the protection record of {where} is not signed by {owner!r}'s key; refusing it"
        ) from None
    if (record.tenant, record.collection) != (owner, collection):
        raise UntrustedProtection(
            f"the signed protection record served for {where} is "
            f"{record.tenant}/{record.collection}'s; refusing it"
        )
    if (record.mode, record.scheme) != (held.mode, held.scheme):
        raise UntrustedProtection(
            f"the cloud says {where} is {held.mode} ({held.scheme}), its owner signed "
            f"{record.mode} ({record.scheme}); refusing to search it"
        )
    return record
