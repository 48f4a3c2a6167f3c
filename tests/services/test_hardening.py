"""Regression tests of issue 18 (hardened edges): each fails on the code before the fix.

No work before authentication (a body is never read for a refused token, nor over the limit),
secrets and token hygiene, bounded decoders, canonical stored PNGs, errors without internal
paths, aggregated audit lines of anonymous clients.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from pathlib import Path

import pytest

from pecbir_contracts.auth import (
    ENCRYPTOR_TOKEN,
    GATEWAY_TOKEN,
    SEARCH_TOKEN,
    AuthError,
    InsecureSecret,
    check_secret,
    mint_token,
    verify_token,
)
from pecbir_harness.embedded import EmbeddedSystem

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"0123456789abcdef0123456789abcdef-hardening"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with EmbeddedSystem(tmp_path_factory.mktemp("hardening")) as embedded:
        yield embedded


def _apps(system: EmbeddedSystem) -> dict[str, tuple[object, str, str]]:
    """(app, a POST path with a body, a valid bearer token) of each HTTP service."""
    search_token = mint_token(
        system.cloud_secret.hex().encode(),
        kind=SEARCH_TOKEN,
        sub="gateway",
        tenant=system.tenant,
        scopes=("search",),
        ttl_s=60,
    )
    return {
        "gateway": (system.gateway_app, "/v1/collections/brain/images", system.cloud_token()),
        "search": (system.search_app, "/v1/collections/brain/search", search_token),
        "encryptor": (system.encryptor_app, "/v1/collections/brain/images", system.user_token()),
    }


def _call(app, path: str, headers: dict[str, str], chunks: list[bytes]) -> tuple[int, int]:
    """(status, body bytes the app pulled) of one raw ASGI POST whose body comes in `chunks`."""
    pulled = 0
    pending = list(chunks)
    status = 0

    async def receive() -> dict:
        nonlocal pulled
        if not pending:
            return {"type": "http.request", "body": b"", "more_body": False}
        chunk = pending.pop(0)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    return status, pulled


MULTIPART = {"content-type": "multipart/form-data; boundary=x"}
_PART = b'--x\r\nContent-Disposition: form-data; name="cipher"; filename="c.png"\r\n\r\n'
BIG = [_PART + b"\0" * (1 << 20)] + [b"\0" * (1 << 20)] * 39  # 40 MiB, in 1 MiB messages


@pytest.mark.parametrize("service", ["gateway", "search", "encryptor"])
@pytest.mark.parametrize(
    "authorization", [None, "Bearer a.b.c", "Basic dXNlcjpwdw=="], ids=["none", "bad", "basic"]
)
def test_no_body_byte_is_read_before_the_token_is_checked(system, service, authorization):
    app, path, _ = _apps(system)[service]
    headers = dict(MULTIPART, **({"authorization": authorization} if authorization else {}))
    status, pulled = _call(app, path, headers, BIG)
    assert status == 401
    assert pulled == 0, f"{service} read {pulled} body bytes before refusing the token"


@pytest.mark.parametrize("service", ["gateway", "search", "encryptor"])
def test_a_body_over_the_limit_is_refused_by_its_length_or_at_the_first_byte_over(system, service):
    app, path, token = _apps(system)[service]
    headers = dict(MULTIPART, authorization=f"Bearer {token}")
    declared = {**headers, "content-length": str(10**12)}
    assert _call(app, path, declared, BIG) == (413, 0)
    # Chunked (no Content-Length): read until the limit is passed, then refused.
    endless = BIG + BIG[1:] * 5  # 235 MiB, over every service's limit
    status, pulled = _call(app, path, headers, endless)
    assert status == 413
    assert pulled < sum(map(len, endless))


def test_stow_body_is_refused_by_its_length_before_it_is_read(system, tmp_path):
    from fastapi.testclient import TestClient

    from pecbir_encryptor.app import create_app

    # The STOW root has its own limit (its body is spooled to disk, not held): a small one here.
    limit = 8 * 1024 * 1024
    settings = system.encryptor_app.state.context.settings.model_copy(
        update={"max_stow_bytes": limit, "spool_dir": tmp_path}
    )
    app = create_app(settings, master=system.master, gateway_client=TestClient(system.gateway_app))
    headers = {
        "content-type": 'multipart/related; type="application/dicom"; boundary=x',
        "authorization": f"Bearer {system.user_token()}",
        "content-length": str(limit + 1),
    }
    status, pulled = _call(app, "/dicomweb/brain/studies", headers, BIG)
    assert (status, pulled) == (413, 0)
    headers.pop("content-length")
    status, pulled = _call(app, "/dicomweb/brain/studies", headers, [*BIG, *BIG])
    assert status == 413 and pulled <= limit + len(BIG[0])
    assert list(tmp_path.iterdir()) == []  # the partial spool file is gone


# -- secrets ----------------------------------------------------------------------------------
def _shipped_placeholders() -> set[str]:
    """Every value of a secret-like variable in deploy/, docs/ and the READMEs."""
    files = [ROOT / "README.md", ROOT / "services" / "README.md"]
    for folder in ("deploy", "docs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix != ".png"]
    found: set[str] = set()
    pattern = re.compile(r"(?:SECRET|TOKEN|PASSWORD)[A-Z_]*=['\"]?([A-Za-z0-9_\-.]{6,})")
    for path in files:
        text = path.read_text(errors="ignore")
        found |= {m.group(1) for m in pattern.finditer(text)}
        found |= set(re.findall(r"change-?me[\w\-]*", text, re.I))
    return {value for value in found if not value.startswith(("$", "{"))}


def test_every_placeholder_secret_shipped_in_the_repo_is_refused():
    placeholders = _shipped_placeholders()
    assert any(p.startswith("change-me") and len(p) >= 32 for p in placeholders), placeholders
    for value in placeholders:
        with pytest.raises(InsecureSecret):
            check_secret(value, "PECBIR_TOKEN_SECRET")
    for weak in ("short", "a" * 64, "x" * 40):
        with pytest.raises(InsecureSecret):
            check_secret(weak, "PECBIR_TOKEN_SECRET")
    assert check_secret(SECRET, "PECBIR_TOKEN_SECRET") == SECRET


def test_services_refuse_to_start_on_a_placeholder_or_short_secret(tmp_path):
    from pecbir_gateway.app import create_app as gateway_app
    from pecbir_gateway.settings import GatewaySettings
    from pecbir_platform.store import FilesystemStore
    from pecbir_search.app import create_app as search_app
    from pecbir_search.settings import SearchSettings

    store = FilesystemStore(tmp_path / "s")
    for secret in ("change-me-token-secret-at-least-32-bytes", "too-short"):
        with pytest.raises(InsecureSecret, match="PECBIR_TOKEN_SECRET"):
            gateway_app(GatewaySettings(token_secret=secret), store=store)
        with pytest.raises(InsecureSecret, match="PECBIR_TOKEN_SECRET"):
            search_app(SearchSettings(token_secret=secret, follow=False), store=store)


# -- tokens -----------------------------------------------------------------------------------
def _forge(payload: dict, secret: bytes = SECRET) -> str:
    import jwt

    return jwt.encode(payload, secret, algorithm="HS256")


def _claims(**overrides) -> dict:
    now = int(time.time())
    claims = {
        "iss": GATEWAY_TOKEN.issuer,
        "aud": GATEWAY_TOKEN.audience,
        "sub": "u",
        "tenant": "hosp-a",
        "scopes": ["read"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def test_token_hygiene_lifetime_times_audience_issuer_and_encoding():
    good = _forge(_claims())
    assert verify_token(SECRET, good, kind=GATEWAY_TOKEN).sub == "u"
    now = int(time.time())
    refused = {
        "exp in year 3000": _forge(_claims(exp=32503680000)),
        "iat 3 years ahead": _forge(_claims(iat=now + 3 * 365 * 86400)),
        "nbf ahead": _forge(_claims(nbf=now + 3600)),
        "no nbf": _forge(_claims(nbf=None)),
        "no aud": _forge(_claims(aud=None)),
        "no iss": _forge(_claims(iss=None)),
        "search audience": _forge(_claims(aud=SEARCH_TOKEN.audience)),
        "encryptor issuer": _forge(_claims(iss=ENCRYPTOR_TOKEN.issuer)),
        "trailing =": good + "=",
        "padded payload": good.replace(".", "=.", 1),
    }
    # A signature whose last character differs only in bits that base64 drops.
    signature = good.rsplit(".", 1)[1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    twin = alphabet[last ^ 1]
    if base64.urlsafe_b64decode(signature[:-1] + twin + "=") == base64.urlsafe_b64decode(
        signature + "="
    ):
        refused["non-canonical signature"] = good[:-1] + twin
    for name, token in refused.items():
        with pytest.raises(AuthError):
            verify_token(SECRET, token, kind=GATEWAY_TOKEN)
            pytest.fail(name)
    with pytest.raises(ValueError, match="at most"):
        mint_token(SECRET, kind=SEARCH_TOKEN, sub="u", tenant="t", scopes=(), ttl_s=3600)


def test_a_token_for_one_service_is_refused_by_another_sharing_its_secret(system):
    from fastapi.testclient import TestClient

    gateway_token = system.cloud_token()
    with TestClient(system.search_app) as search:
        answer = search.get(
            "/v1/collections/brain/status", headers={"authorization": f"Bearer {gateway_token}"}
        )
    assert answer.status_code == 401, answer.text
    assert json.loads(answer.text)["detail"]


# -- decoders bounded before they allocate ----------------------------------------------------
def _dicom(rows: int = 48, columns: int = 48, *, pixel_bytes: int | None = None, **extra) -> bytes:
    import numpy as np
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from pecbir_harness.dicom import make_mr
    from tests.services.helpers import dicom_bytes

    dataset = make_mr(np.zeros((2, 2), np.uint16))
    dataset.Rows, dataset.Columns = rows, columns
    dataset.PixelData = bytes(2 * rows * columns if pixel_bytes is None else pixel_bytes)
    if extra.get("deflated"):
        dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    if extra.get("blob"):
        dataset.add_new(0x00091010, "OB", bytes(extra["blob"]))
    return dicom_bytes(dataset)


def test_a_deflate_bomb_is_refused_before_it_is_inflated():
    from pecbir_encryptor.inputs import read_mask, read_pixels

    bomb = _dicom(deflated=True, blob=40_000_000)  # 40 MB of zeros in ~40 KB
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="inflates past"):
        read_pixels(bomb, max_pixels=2048 * 2048)
    with pytest.raises(ValueError, match="inflates past"):
        read_mask(bomb, max_pixels=2048 * 2048)
    # A deflated image of honest size is read.
    pixels, _ = read_pixels(_dicom(deflated=True), max_pixels=2048 * 2048)
    assert pixels.shape == (48, 48)


def test_dicom_size_is_checked_from_the_header_before_decoding():
    from pecbir_encryptor.inputs import read_pixels

    # 12000 x 12000 declared, 10 bytes of pixel data: refused by its declared size, not by
    # a failed (or, for RLE, a 288 MB) decode.
    with pytest.raises(ValueError, match="exceeds the limit"):
        read_pixels(_dicom(12000, 12000, pixel_bytes=10), max_pixels=2048 * 2048)
    with pytest.raises(ValueError, match="exceeds the limit"):
        read_pixels(_dicom(64, 64), max_pixels=48 * 48)


def test_stow_applies_the_ingest_path_s_pixel_limit_before_encrypting(system):
    import numpy as np
    import pydicom

    from tests.services.helpers import dicom_bytes, make_seg, multipart_related

    image = _dicom(3000, 3000, pixel_bytes=16)
    source = pydicom.dcmread(io.BytesIO(image))
    seg = dicom_bytes(make_seg(np.ones((8, 8), bool), source))
    body, content_type = multipart_related([image, seg])
    answer = system.encryptor.post(
        "/dicomweb/brain/studies", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code == 409, answer.text
    comments = [
        item["00000902"]["Value"][0]
        for item in answer.json()["00081198"]["Value"]
        if "00000902" in item
    ]
    assert any("exceeds the limit" in text for text in comments), comments


# -- per-caller budgets -----------------------------------------------------------------------
def _gateway(tmp_path, **settings):
    import httpx
    from fastapi.testclient import TestClient

    from pecbir_gateway.app import create_app
    from pecbir_gateway.settings import GatewaySettings
    from pecbir_platform.store import FilesystemStore
    from tests.services.conftest import RecordingDispatcher
    from tests.services.helpers import TOKEN_SECRET

    def no_search(request):
        return httpx.Response(409, json={"detail": "no model yet"})

    store = FilesystemStore(tmp_path / "store")
    app = create_app(
        GatewaySettings(token_secret=TOKEN_SECRET.decode(), **settings),
        store=store,
        dispatcher=RecordingDispatcher(),
        search_client=httpx.Client(base_url="http://s", transport=httpx.MockTransport(no_search)),
    )
    return TestClient(app), store


def test_training_requests_are_budgeted_per_token_with_429_and_retry_after(tmp_path):
    from tests.services.helpers import auth

    client, store = _gateway(tmp_path, rate_limits="train=0.0001/3")
    headers = auth()
    answers = [client.post("/v1/collections/brain/model/train", headers=headers) for _ in range(6)]
    assert [a.status_code for a in answers] == [202, 202, 202, 429, 429, 429]
    assert int(answers[-1].headers["retry-after"]) >= 1
    assert "rate limit" in answers[-1].json()["detail"]
    versions = [k for k in store.list("tenants/") if k.endswith("request.json")]
    assert len(versions) == 3  # nothing written for a refused request
    # Another tenant has its own budget.
    assert (
        client.post("/v1/collections/brain/model/train", headers=auth("hosp-b")).status_code == 202
    )


def test_a_tenant_budget_holds_across_its_tokens(tmp_path):
    from tests.services.helpers import auth

    client, _ = _gateway(tmp_path, rate_limits="train=0.0001/1")
    # one base time: with time.time() per request, a slow request (> 1 s under load) made the
    # next token's iat equal an earlier one's, i.e. the same token twice
    base = time.time()
    statuses = [
        client.post("/v1/collections/brain/model/train", headers=auth(now=base - i)).status_code
        for i in range(8)  # eight tokens (another iat each) of one tenant: 4 tokens' worth
    ]
    assert statuses.count(202) == 4 and statuses[-1] == 429


def test_redis_buckets_share_one_budget_across_replicas(tmp_path):
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary: the Redis token buckets cannot be tested")
    from pecbir_harness.procs import RedisProcess
    from pecbir_platform.ratelimit import Budget, RedisBuckets

    redis = RedisProcess(tmp_path / "redis").start()
    try:
        replicas = [RedisBuckets(redis.url), RedisBuckets(redis.url)]
        budget = Budget(per_s=0.0001, burst=4)
        waits = [replicas[i % 2].take("search:token:t", budget) for i in range(6)]
        assert waits[:4] == [0.0] * 4 and all(w > 1 for w in waits[4:])
    finally:
        redis.stop()


def test_query_image_and_roi_are_capped_at_the_gateway(tmp_path):
    import numpy as np

    from tests.services.helpers import auth, upload_files

    client, _ = _gateway(tmp_path, max_query_pixels=64 * 64, max_query_roi_pixels=500)
    big = np.zeros((96, 96), np.uint8)
    files = upload_files(big, np.ones((96, 96), bool))
    files.pop("metadata")
    answer = client.post("/v1/collections/brain/search", files=files, headers=auth())
    assert answer.status_code == 413 and "exceeds the limit of 4096" in answer.json()["detail"]
    files = upload_files(np.zeros((48, 48), np.uint8), np.ones((48, 48), bool))
    files.pop("metadata")
    answer = client.post("/v1/collections/brain/search", files=files, headers=auth())
    assert answer.status_code == 413 and "tumour mask of 2304 pixels" in answer.json()["detail"]


# -- stored bytes are canonical ---------------------------------------------------------------
def test_stored_pngs_are_the_canonical_encoding_of_their_pixels(tmp_path):
    import struct
    import zlib

    from pecbir_contracts.png import decode_image_png, decode_mask_png, encode_png
    from tests.services.helpers import auth, blob_image, metadata_json

    client, store = _gateway(tmp_path)
    image, mask = blob_image(seed=3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    canonical = encode_png(image)
    text = chunk(b"tEXt", b"PatientName\x00DOE^JOHN")
    # A tEXt chunk after IHDR, junk after IEND, and an IDAT recompressed at level 0 (bloated).
    tagged = canonical[:33] + text + canonical[33:] + b"\x00junk" * 1000
    raw = zlib.decompress(canonical[41 : canonical.index(b"IEND") - 8])
    bloated_idat = chunk(b"IDAT", zlib.compress(raw, 0))
    bloated = canonical[:33] + bloated_idat + canonical[-12:]
    for cipher in (tagged, bloated):
        files = {
            "cipher": ("c.png", cipher, "image/png"),
            "mask": ("m.png", encode_png(mask) + b"trailing", "image/png"),
            "metadata": (None, metadata_json(image.shape)),
        }
        answer = client.post("/v1/collections/brain/images", files=files, headers=auth())
        assert answer.status_code == 202, answer.text
        image_id = answer.json()["image_id"]
        stored = store.get(f"tenants/hosp-a/collections/brain/images/{image_id}/cipher.png")
        stored_mask = store.get(f"tenants/hosp-a/collections/brain/images/{image_id}/mask.png")
        assert stored == canonical
        assert stored_mask == encode_png(mask)
        assert b"DOE^JOHN" not in stored and b"junk" not in stored
        assert (decode_image_png(stored) == image).all()
        assert (decode_mask_png(stored_mask) == mask).all()


# -- errors and audit -------------------------------------------------------------------------
def test_an_overlong_model_version_is_a_client_error_without_internal_paths(tmp_path):
    from tests.services.helpers import auth

    client, _ = _gateway(tmp_path)
    answer = client.get("/v1/collections/brain/model/v" + "9" * 5000, headers=auth())
    assert 400 <= answer.status_code < 500, answer.status_code
    assert str(tmp_path) not in answer.text and "/store" not in answer.text


def test_store_failures_do_not_disclose_paths(tmp_path):
    from pecbir_contracts.store import StorageError
    from pecbir_platform.web import _storage_failed

    answer = _storage_failed(None, StorageError(f"cannot read {tmp_path}/store/x: denied"))
    assert answer.status_code == 503 and str(tmp_path).encode() not in answer.body


def _audit_lines(system, before: int) -> list[dict]:
    path = system.root / "encryptor-audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()[before:]]


def _audit_count(system) -> int:
    path = system.root / "encryptor-audit.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_key_release_for_a_bad_collection_and_decrypt_failures_are_audited(system):
    before = _audit_count(system)
    answer = system.encryptor.post(
        "/v1/keys/release", json={"collection": "Bad Name!", "image_id": "0" * 32}
    )
    assert answer.status_code == 422
    assert [(r["action"], r["outcome"]) for r in _audit_lines(system, before)] == [
        ("key-release", "refused")
    ]
    before = _audit_count(system)
    missing = system.encryptor.get(f"/v1/collections/brain/images/{'0' * 32}/plain")
    assert missing.status_code == 404  # the gateway's answer, passed on
    bad = system.encryptor.get("/v1/collections/Bad!/images/xyz/plain")
    assert bad.status_code == 422
    assert [(r["action"], r["outcome"]) for r in _audit_lines(system, before)] == [
        ("decrypt", "refused"),
        ("decrypt", "refused"),
    ]


def test_anonymous_requests_cannot_flood_the_audit_log(system):
    audit = system.encryptor_app.state.encryptor.audit
    # One interval for the whole loop, however slow the machine.
    audit.anonymous_interval_s, audit._anonymous_line_at = 3600.0, -float("inf")
    before = _audit_count(system)
    for i in range(200):
        answer = system.encryptor.post(
            f"/v1/keys/release/{'x' * 100}{i}", headers={"authorization": "Bearer nope"}
        )
        assert answer.status_code == 401
    new = _audit_lines(system, before)
    audit.anonymous_interval_s = 10.0
    assert len(new) == 1 and new[0]["outcome"] == "unauthenticated"
    assert "xxxx" not in json.dumps(new)  # no client-chosen path in the log


def test_the_ingress_caps_bodies_just_above_the_gateway_s_own_limit():
    import yaml

    from pecbir_platform.web import MULTIPART_OVERHEAD_BYTES

    base = ROOT / "deploy" / "k8s" / "base" / "cloud"
    ingress = yaml.safe_load((base / "ingress.yaml").read_text())
    cap = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert cap.endswith("m")
    config = (base / "kustomization.yaml").read_text()
    upload = int(re.search(r"PECBIR_MAX_UPLOAD_BYTES=(\d+)", config).group(1))
    gateway_limit = 2 * upload + MULTIPART_OVERHEAD_BYTES
    assert gateway_limit <= int(cap[:-1]) * 2**20 < gateway_limit + 2**20


def test_peer_failures_do_not_disclose_internal_hosts(tmp_path):
    import httpx

    from tests.services.helpers import auth, blob_image, upload_files

    client, _ = _gateway(tmp_path)

    def unreachable(request):
        raise httpx.ConnectError("connection refused: search-internal.pecbir.svc:8002")

    client.app.state.context.search = httpx.Client(
        base_url="http://s", transport=httpx.MockTransport(unreachable)
    )
    files = upload_files(*blob_image())
    files.pop("metadata")
    answer = client.post("/v1/collections/brain/search", files=files, headers=auth())
    assert answer.status_code == 503
    assert "search-internal" not in answer.text


def test_budgets_are_not_enforced_while_their_store_is_unreachable():
    from pecbir_contracts.auth import Claims
    from pecbir_platform.ratelimit import RateLimiter, RedisBuckets

    unreachable = RedisBuckets("redis://127.0.0.1:1/0")
    limiter = RateLimiter(RateLimiter.from_settings("search=0.01/1", None).budgets, unreachable)
    claims = Claims(sub="u", tenant="t", scopes=("search",), iat=0, exp=1)
    for _ in range(3):
        limiter.check("search", claims)  # served (and logged), not a 500 for every caller
