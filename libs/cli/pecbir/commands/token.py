"""`pecbir token mint | inspect | revoke`: credentials of every kind, without reading auth.py.

Kinds: ``gateway`` (the cloud's clients: hospitals' encryptors, operators; signed with
``PECBIR_TOKEN_SECRET``, at most 30 days), ``search`` (the gateway's calls to search, 5
minutes; for tests and operators), ``encryptor`` (a hospital's users at its encryptor; signed
with ``PECBIR_ENCRYPTOR_USER_TOKEN_SECRET``, at most 12 hours) and ``pacs`` (a PACS account's
long-lived API key at the encryptor, stored hashed in ``PECBIR_ENCRYPTOR_PACS_CREDENTIALS``).

Signed tokens are revoked by id or by subject in the list named by ``PECBIR_REVOKED_TOKENS``
(every service re-reads it when it changes); PACS keys by key id or account in their file.
The secret is read from the environment variable (or ``--secret-file``), never an argument,
so that it stays out of shell history and process lists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SIGNED_KINDS = {
    "gateway": ("GATEWAY_TOKEN", "PECBIR_TOKEN_SECRET"),
    "search": ("SEARCH_TOKEN", "PECBIR_TOKEN_SECRET"),
    "encryptor": ("ENCRYPTOR_TOKEN", "PECBIR_ENCRYPTOR_USER_TOKEN_SECRET"),
}
KINDS = (*SIGNED_KINDS, "pacs")
CREDENTIALS_ENV = "PECBIR_ENCRYPTOR_PACS_CREDENTIALS"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "token",
        help="mint, inspect or revoke a token or PACS API key",
        description=__doc__.split("\n\n")[1],
    )
    actions = parser.add_subparsers(dest="action", required=True)

    mint = actions.add_parser("mint", help="a new token (printed) or PACS API key (shown once)")
    mint.add_argument("--kind", choices=KINDS, required=True)
    mint.add_argument("--sub", help="who (signed kinds): a user, a hospital's encryptor, …")
    mint.add_argument("--tenant", help="whose data (signed kinds)")
    mint.add_argument("--scopes", default="", help="comma-separated, e.g. upload,search")
    mint.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (signed kinds)")
    mint.add_argument("--account", help="the PACS account (kind pacs), e.g. orthanc-main")
    _secret_arguments(mint)
    mint.set_defaults(func=run_mint)

    inspect = actions.add_parser("inspect", help="what a token or key says, and if it is valid")
    inspect.add_argument("token", help="the token or API key ('-': read from standard input)")
    inspect.add_argument("--kind", choices=KINDS, help="check it as this kind (default: its aud)")
    _secret_arguments(inspect)
    inspect.set_defaults(func=run_inspect)

    revoke = actions.add_parser("revoke", help="revoke a token, a subject's tokens, or a key")
    revoke.add_argument("token", nargs="?", help="the token or API key to revoke ('-': stdin)")
    revoke.add_argument("--jti", help="a signed token's id (from inspect)")
    revoke.add_argument("--sub", help="revoke every token of this subject issued until now")
    revoke.add_argument("--tenant", help="the subject's tenant (with --sub)")
    revoke.add_argument("--key-id", help="a PACS API key's id")
    revoke.add_argument("--account", help="every key of this PACS account")
    revoke.add_argument(
        "--list",
        type=Path,
        default=None,
        help="the revocation list of signed tokens (default: $PECBIR_REVOKED_TOKENS)",
    )
    _secret_arguments(revoke)
    revoke.set_defaults(func=run_revoke)


def _secret_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-env", help="variable holding the signing secret (default: by kind)"
    )
    parser.add_argument("--secret-file", type=Path, help="file holding the signing secret")
    parser.add_argument(
        "--credentials",
        type=Path,
        help=f"PACS credentials file (default: ${CREDENTIALS_ENV})",
    )


def _secret(args: argparse.Namespace, kind: str) -> bytes | None:
    if args.secret_file is not None:
        return args.secret_file.read_text().strip().encode()
    value = os.environ.get(args.secret_env or SIGNED_KINDS[kind][1])
    return value.encode() if value else None


def _token_kind(kind: str):  # -> pecbir_contracts.auth.TokenKind
    import pecbir_contracts.auth as auth

    return getattr(auth, SIGNED_KINDS[kind][0])


def _credentials(args: argparse.Namespace):  # -> PacsCredentials
    from pecbir_encryptor.credentials import PacsCredentials

    path = args.credentials or os.environ.get(CREDENTIALS_ENV)
    if not path:
        raise SystemExit(f"name the PACS credentials file: --credentials or ${CREDENTIALS_ENV}")
    return PacsCredentials(Path(path), os.environ.get("PECBIR_ENCRYPTOR_TENANT", "-"))


def _read(value: str) -> str:
    return sys.stdin.read().strip() if value == "-" else value.strip()


def run_mint(args: argparse.Namespace) -> int:
    scopes = tuple(s for s in args.scopes.split(",") if s)
    if args.kind == "pacs":
        if not args.account:
            raise SystemExit("--account is required for a PACS key")
        try:
            key, api_key = _credentials(args).create(args.account, scopes or ("upload",))
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        print(api_key)
        print(
            f"# PACS account {key.account}, key {key.key_id}, scopes {','.join(key.scopes)}: "
            "shown once, stored hashed. Send it as 'X-API-Key: <key>' or HTTP basic "
            f"'{key.account}:<key>' (Orthanc: DicomWeb Servers Username/Password).",
            file=sys.stderr,
        )
        return 0
    from pecbir_contracts.auth import check_secret, mint_token

    if not (args.sub and args.tenant):
        raise SystemExit("--sub and --tenant are required for a signed token")
    secret = _secret(args, args.kind)
    if secret is None:
        raise SystemExit(f"set ${args.secret_env or SIGNED_KINDS[args.kind][1]} or --secret-file")
    try:
        token = mint_token(
            check_secret(secret, "the signing secret"),
            kind=_token_kind(args.kind),
            sub=args.sub,
            tenant=args.tenant,
            scopes=scopes,
            ttl_s=args.ttl,
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(token)
    return 0


def _inspect_key(args: argparse.Namespace, api_key: str) -> dict[str, object]:
    from pecbir_contracts.auth import AuthError

    credentials = _credentials(args)
    key_id = api_key.split(".")[1] if api_key.count(".") == 2 else None
    known = {key.key_id: key for key in credentials.list_keys()}
    report: dict[str, object] = {"kind": "pacs", "key_id": key_id}
    key = known.get(key_id or "")
    if key is not None:
        report.update(account=key.account, scopes=list(key.scopes), created=key.created)
        report["revoked"] = key.revoked
    try:
        credentials.verify(api_key)
        report["valid"] = True
    except AuthError as exc:
        report.update(valid=False, reason=str(exc))
    return report


def run_inspect(args: argparse.Namespace) -> int:
    import jwt

    from pecbir_contracts.auth import TOKEN_KINDS, AuthError
    from pecbir_platform.web import verify_bearer

    value = _read(args.token)
    if args.kind == "pacs" or value.startswith("pcb."):
        report = _inspect_key(args, value)
    else:
        try:
            claims = jwt.decode(value, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise SystemExit(f"not a token: {exc}") from None
        kind_name = args.kind or next(
            (k for k in SIGNED_KINDS if _token_kind(k) is TOKEN_KINDS.get(claims.get("aud"))),
            None,
        )
        report = {"kind": kind_name, "claims": claims}
        if "exp" in claims:
            report["expires_in_s"] = int(claims["exp"] - time.time())
        secret = _secret(args, kind_name) if kind_name else None
        if secret is None:
            report["valid"] = None
            report["reason"] = "signature not checked: no secret given"
        else:
            try:
                verify_bearer(secret, f"Bearer {value}", kind=_token_kind(kind_name))
                report["valid"] = True
            except AuthError as exc:
                report.update(valid=False, reason=str(exc))
    print(json.dumps(report, indent=2, default=str))
    return 0 if report.get("valid") is not False else 1


def run_revoke(args: argparse.Namespace) -> int:
    import jwt

    from pecbir_platform.revocation import REVOCATIONS_ENV, revoke

    value = _read(args.token) if args.token else None
    if args.key_id or args.account or (value or "").startswith("pcb."):
        key_id = args.key_id or (value.split(".")[1] if value else None)
        try:
            revoked = _credentials(args).revoke(key_id=key_id, account=args.account)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        for key in revoked:
            print(f"revoked PACS key {key.key_id} of account {key.account}")
        return 0
    path = args.list or (
        Path(os.environ[REVOCATIONS_ENV]) if REVOCATIONS_ENV in os.environ else None
    )
    if path is None:
        raise SystemExit(f"name the revocation list: --list or ${REVOCATIONS_ENV}")
    jti = args.jti
    if value:
        claims = jwt.decode(value, options={"verify_signature": False})
        jti = claims.get("jti")
        if jti is None:  # minted before tokens had ids: revoke by subject
            args.sub, args.tenant = claims["sub"], claims["tenant"]
    try:
        entry = revoke(path, jti=jti, tenant=args.tenant, sub=args.sub)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(f"revoked {json.dumps(entry)} in {path}")
    return 0
