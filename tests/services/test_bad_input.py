"""Malformed requests: always a 4xx naming the problem, never a 500, and nothing stored.

Schemathesis drives the gateway's and the encryptor's OpenAPI schemas (schema-valid and
schema-violating requests, in-process ASGI); hypothesis mutates valid PNG uploads; the rest are
hand-picked bad inputs (dtypes, shapes, DICOM, bombs, path-like ids, tenants, tokens).
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from pecbir_contracts.auth import SEARCH_TOKEN
from pecbir_contracts.png import encode_png
from pecbir_gateway.app import create_app
from pecbir_gateway.settings import GatewaySettings
from pecbir_harness.dicom import make_mr
from pecbir_harness.embedded import EmbeddedSystem
from pecbir_platform.store import FilesystemStore
from pecbir_search.app import create_app as search_app
from pecbir_search.settings import SearchSettings
from pecore.keys import MasterKey
from tests.services.conftest import RecordingDispatcher
from tests.services.helpers import (
    TOKEN_SECRET,
    auth,
    blob_image,
    dicom_bytes,
    labelled_set,
    make_seg,
    metadata_json,
    npy_bytes,
    png_claiming,
    upload_files,
)

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


def _cloud(root: Path):
    store = FilesystemStore(root / "store")
    search = TestClient(
        search_app(SearchSettings(token_secret=TOKEN_SECRET.decode(), follow=False), store=store)
    )
    dispatcher = RecordingDispatcher()
    app = create_app(
        GatewaySettings(
            token_secret=TOKEN_SECRET.decode(), max_upload_bytes=300_000, max_pixels=512 * 512
        ),
        store=store,
        dispatcher=dispatcher,
        search_client=search,
    )
    return app, store, dispatcher


def _objects(store) -> list[str]:
    return store.list("")


def _check(answer, store, before: list[str], what: str) -> None:
    assert answer.status_code < 500, (what, answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        assert _objects(store) == before, (what, answer.status_code, answer.text[:300])
        detail = answer.json().get("detail")
        assert detail, (what, answer.text[:300])


# -- schemathesis: the gateway ----------------------------------------------------------------
# Built at import: schemathesis parametrises from the schema at collection time.
_gateway_app, _gateway_store, _ = _cloud(Path(tempfile.mkdtemp(prefix="fuzz-gateway")))
gateway_schema = schemathesis.openapi.from_asgi("/openapi.json", _gateway_app)
gateway_schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@gateway_schema.parametrize()
@FUZZ
def test_gateway_schema_fuzz_never_500_and_stores_nothing_on_refusal(case):
    before = _objects(_gateway_store)
    answer = case.call(headers=auth())
    _check(answer, _gateway_store, before, case.as_curl_command())


# -- schemathesis: the encryptor (owner side, in front of an embedded cloud) --------------------
@schemathesis.serializer('multipart/related; type="application/dicom"', "multipart/related")
def _raw_stow_body(ctx, value) -> bytes:
    """The STOW-RS body is raw bytes (documented as a binary string): fuzz it as such."""
    return value if isinstance(value, bytes) else str(value).encode()


_embedded = EmbeddedSystem(Path(tempfile.mkdtemp(prefix="fuzz-enc")), master=MasterKey.from_seed(5))
encryptor_schema = schemathesis.openapi.from_asgi("/openapi.json", _embedded.encryptor_app)
encryptor_schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@encryptor_schema.parametrize()
@FUZZ
def test_encryptor_schema_fuzz_never_500(case):
    before = _objects(_embedded.store)
    answer = case.call(headers={"authorization": f"Bearer {_embedded.user_token()}"})
    _check(answer, _embedded.store, before, case.as_curl_command())


# -- hypothesis: mutated PNG uploads ----------------------------------------------------------
@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    return _cloud(tmp_path_factory.mktemp("cloud"))


@st.composite
def mutated_png(draw):
    image, mask = blob_image(draw(st.integers(0, 3)))
    target = draw(st.sampled_from(["cipher", "mask"]))
    data = bytearray(encode_png(image if target == "cipher" else mask))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        data = data[:at]
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    else:
        data[at : at + 16] = draw(st.binary(min_size=0, max_size=16))
    return target, bytes(data), image, mask


@given(mutated=mutated_png())
@FUZZ
def test_mutated_png_uploads_are_accepted_whole_or_refused_clearly(cloud, mutated):
    app, store, _ = cloud
    client = TestClient(app)
    target, data, image, mask = mutated
    files = upload_files(image, mask) | {target: (f"{target}.png", data, "image/png")}
    before = _objects(store)
    answer = client.post("/v1/collections/fuzz/images", files=files, headers=auth())
    _check(answer, store, before, f"{target} mutated")
    assert answer.status_code in (202, 413, 422), answer.text


# -- hand-picked bad inputs at the encryptor --------------------------------------------------
def _encryptor_cases():
    images, masks, _ = labelled_set(1)
    image, mask = images[0], masks[0]
    dataset = make_mr(image.astype(np.uint16), bits_stored=12)
    dicom = dicom_bytes(dataset)
    seg = dicom_bytes(make_seg(mask, dataset))
    big = npy_bytes(np.zeros((5000, 5000), np.uint8))
    return {
        "complex dtype": (npy_bytes(image.astype(complex)), npy_bytes(mask), 422, "dtype"),
        "bool image": (npy_bytes(mask), npy_bytes(mask), 422, "dtype"),
        "structured dtype": (
            npy_bytes(np.zeros(image.shape, dtype=[("a", "u1"), ("b", "u1")])),
            npy_bytes(mask),
            422,
            "dtype",
        ),
        "NaN image": (npy_bytes(np.full(image.shape, np.nan)), npy_bytes(mask), 422, "NaN"),
        "3-D image": (npy_bytes(np.stack([image] * 3)), npy_bytes(mask), 422, "2-D"),
        "1-D image": (npy_bytes(image.ravel()), npy_bytes(mask), 422, "2-D"),
        "object npy": (
            b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, "
            b"'shape': (2, 2), }" + b" " * 60 + b"\n",
            npy_bytes(mask),
            422,
            "npy",
        ),
        "truncated npy": (npy_bytes(image)[:100], npy_bytes(mask), 422, "npy"),
        "npy header claims 25M pixels": (big[:200], npy_bytes(mask), 422, "exceeds"),
        "truncated DICOM": (dicom[:400], npy_bytes(mask), 422, "DICOM"),
        "DICOM pixel data cut": (dicom[:-100], npy_bytes(mask), 422, "pixel data"),
        "corrupt DICOM": (dicom[:300] + bytes(200) + dicom[500:], npy_bytes(mask), 422, "DICOM"),
        "PNG bomb": (png_claiming(60_000, 60_000), npy_bytes(mask), 422, "exceeds"),
        "truncated PNG": (encode_png(image.astype(np.uint8))[:50], npy_bytes(mask), 422, "PNG"),
        "unknown format": (b"GIF89a" + bytes(100), npy_bytes(mask), 422, "not DICOM, PNG or NPY"),
        "empty image": (b"", npy_bytes(mask), 422, "empty"),
        "mask size differs": (npy_bytes(image[:40]), npy_bytes(mask), 422, "differs"),
        "mask empty": (npy_bytes(image), npy_bytes(np.zeros_like(mask)), 422, "empty"),
        "mask not binary": (npy_bytes(image), npy_bytes(mask.astype(np.uint8) + 1), 422, "binary"),
        "mask NaN": (npy_bytes(image), npy_bytes(np.where(mask, np.nan, 0.0)), 422, "NaN"),
        "mask 3-D": (npy_bytes(image), npy_bytes(np.stack([mask] * 2)), 422, "2-D"),
        "mask DICOM not SEG": (npy_bytes(image), dicom, 422, "Segmentation"),
        "SEG truncated": (dicom, seg[:-50], 422, "SEG"),
        "image over the byte limit": (
            b"\x93NUMPY" + bytes(70 * 2**20),
            npy_bytes(mask),
            413,
            "larger",
        ),
    }


ENCRYPTOR_CASES = _encryptor_cases()


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with EmbeddedSystem(tmp_path_factory.mktemp("bad"), master=MasterKey.from_seed(3)) as s:
        yield s


@pytest.mark.parametrize("case", sorted(ENCRYPTOR_CASES))
def test_bad_plain_inputs_at_the_encryptor(system, case):
    image, mask, status, message = ENCRYPTOR_CASES[case]
    before = _objects(system.store)
    answer = system.encryptor.post(
        "/v1/collections/brain/images",
        files={"image": ("image", image), "mask": ("mask", mask)},
        data={"label": "1", "train": "true"},
    )
    assert answer.status_code == status, (case, answer.text[:300])
    assert message in answer.json()["detail"], (case, answer.text[:300])
    assert _objects(system.store) == before


ODD_IDS = [
    "../../etc/passwd",
    "..%2f..%2fmeta.json",
    "%2e%2e",
    "%2e%2e%2f%2e%2e",
    "a\x00b",
    "%00",
    "x" * 5000,
    "0" * 31 + "G",
    "0" * 33,
    "DEADBEEF" * 4,
    "images/..",
    " ",
    "ünïcödé",
]


@pytest.mark.parametrize("odd", ODD_IDS)
def test_path_like_and_odd_ids_are_refused_everywhere(system, odd):
    from urllib.parse import quote

    segment = quote(odd, safe="")
    before = _objects(system.store)
    gateway_paths = [
        f"/v1/collections/brain/images/{segment}",
        f"/v1/collections/brain/images/{segment}/status",
        f"/v1/collections/brain/images/{segment}/cipher",
        f"/v1/collections/brain/images/{segment}/mask",
        f"/v1/collections/brain/model/{segment}",
        f"/v1/blobs/{segment}",
    ]
    if not _NAME.fullmatch(odd):  # e.g. 33 zeros is a fine collection name
        gateway_paths.append(f"/v1/collections/{segment}/model")
    for path in gateway_paths:
        answer = system.gateway.get(path)
        assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text[:200])
    for path, method, body in [
        (f"/v1/collections/brain/images/{segment}/plain", "GET", None),
        ("/v1/keys/release", "POST", {"collection": "brain", "image_id": odd}),
        ("/v1/keys/release", "POST", {"collection": odd, "image_id": "0" * 32}),
    ]:
        answer = system.encryptor.request(method, path, json=body)
        assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text[:200])
    if not _NAME.fullmatch(odd):
        answer = system.gateway.post(
            f"/v1/collections/{segment}/images", files=upload_files(*blob_image())
        )
        assert 400 <= answer.status_code < 500
    assert _objects(system.store) == before


def test_cross_tenant_ids_and_tokens_are_refused(cloud):
    from pecbir_contracts.auth import GATEWAY_TOKEN, mint_token

    app, store, _ = cloud
    client = TestClient(app)
    image, mask = blob_image(seed=9)
    uploaded = client.post(
        "/v1/collections/shared/images", files=upload_files(image, mask), headers=auth("hosp-a")
    )
    assert uploaded.status_code == 202, uploaded.text
    image_id = uploaded.json()["image_id"]
    before = _objects(store)
    other = auth("hosp-b", scopes=("upload", "search", "read", "train"))
    for path in ("", "/status", "/cipher", "/mask"):
        # Same collection name, other tenant: the id does not exist for hosp-b.
        own = client.get(f"/v1/collections/shared/images/{image_id}{path}", headers=other)
        assert own.status_code == 404, (path, own.text)
        # Naming the owner explicitly: not shared → 403.
        foreign = client.get(
            f"/v1/collections/shared/images/{image_id}{path}",
            params={"owner": "hosp-a"},
            headers=other,
        )
        assert foreign.status_code == 403, (path, foreign.text)
    upload_foreign = client.post(
        "/v1/collections/shared/images",
        params={"owner": "hosp-a"},
        files=upload_files(image, mask),
        headers=other,
    )
    assert upload_foreign.status_code == 202  # `owner` is ignored for uploads: own tenant only
    assert upload_foreign.json()["status_url"].endswith("owner=hosp-b")
    now = time.time()
    bad_tokens = {
        "expired": mint_token(
            TOKEN_SECRET,
            kind=GATEWAY_TOKEN,
            sub="u",
            tenant="hosp-a",
            scopes=("upload",),
            ttl_s=60,
            now=now - 3600,
        ),
        "forged": mint_token(
            b"y" * 32, kind=GATEWAY_TOKEN, sub="u", tenant="hosp-a", scopes=("upload",)
        ),
        "garbage": "a.b.c",
        "not a jwt": "x" * 3000,
    }
    before = _objects(store)
    for name, token in bad_tokens.items():
        answer = client.post(
            "/v1/collections/shared/images",
            files=upload_files(image, mask),
            headers={"Authorization": f"Bearer {token}"},
        )
        assert answer.status_code == 401, (name, answer.text)
        assert answer.json()["detail"]
    assert _objects(store) == before


def test_huge_bodies_are_refused_without_storing(cloud):
    app, store, _ = cloud
    client = TestClient(app)
    image, mask = blob_image()
    before = _objects(store)
    huge = upload_files(image, mask) | {"cipher": ("c.png", b"\x89PNG" + bytes(2_000_000))}
    answer = client.post("/v1/collections/fuzz/images", files=huge, headers=auth())
    assert answer.status_code == 413 and "limit" in answer.json()["detail"]
    long_meta = upload_files(image, mask, metadata_json(image.shape, opaque_id="o" * 100_000))
    answer = client.post("/v1/collections/fuzz/images", files=long_meta, headers=auth())
    assert answer.status_code == 422 and "metadata" in answer.json()["detail"]
    assert _objects(store) == before


def test_search_service_rejects_bad_k_and_vectors(tmp_path):
    store = FilesystemStore(tmp_path / "store")
    client = TestClient(
        search_app(SearchSettings(token_secret=TOKEN_SECRET.decode(), follow=False), store=store)
    )
    for body in ({"vector": [0.0], "k": 0}, {"vector": [0.0], "k": -5}, {"vector": "x"}):
        answer = client.post(
            "/v1/collections/brain/knn", json=body, headers=auth(kind=SEARCH_TOKEN, ttl_s=60)
        )
        assert answer.status_code == 422, answer.text
