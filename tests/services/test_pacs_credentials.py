"""Credentials a PACS can hold (issue 14): long-lived, scoped, revocable API keys stored
hashed, HTTP basic mapped to a PACS account, rotation without downtime; `pecbir token` for
every kind; revoked signed tokens refused by the service; the OpenAPI security schemes."""

from __future__ import annotations

import base64
import json

import pytest

from pecbir.cli import main
from pecbir_harness.embedded import EmbeddedSystem
from pecore.keys import MasterKey
from tests.services.helpers import dicom_bytes, mr_with_seg, multipart_related


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with EmbeddedSystem(tmp_path_factory.mktemp("pacs"), master=MasterKey.from_seed(12)) as s:
        yield s


def _mint_pacs(system, capsys, account="orthanc-main", scopes="upload") -> str:
    credentials = system.encryptor_app.state.context.settings.pacs_credentials
    code = main(
        [
            "token", "mint", "--kind", "pacs", "--account", account, "--scopes", scopes,
            "--credentials", str(credentials),
        ]
    )  # fmt: skip
    assert code == 0
    return capsys.readouterr().out.strip()


def _stow(system, headers: dict[str, str]):
    image, seg, _, _ = mr_with_seg(40)
    body, content_type = multipart_related([dicom_bytes(image), dicom_bytes(seg)])
    return system.encryptor.post(
        "/dicomweb/brain/studies",
        content=body,
        # No user token: only what the PACS holds.
        headers={"content-type": content_type, "authorization": "", **headers},
    )


def test_a_pacs_key_works_as_header_bearer_and_basic_and_is_stored_hashed(system, capsys):
    api_key = _mint_pacs(system, capsys)
    assert api_key.startswith("pcb.")
    stored = system.encryptor_app.state.context.settings.pacs_credentials.read_text()
    assert api_key not in stored and api_key.split(".")[2] not in stored
    basic = base64.b64encode(f"orthanc-main:{api_key}".encode()).decode()
    for headers in (
        {"x-api-key": api_key},
        {"authorization": f"Bearer {api_key}"},
        {"authorization": f"Basic {basic}"},
    ):
        answer = _stow(system, headers)
        assert answer.status_code in (200, 202), (headers, answer.text)
    # Basic with another account's name, or a wrong key: 401, saying why.
    wrong = base64.b64encode(f"other:{api_key}".encode()).decode()
    refused = _stow(system, {"authorization": f"Basic {wrong}"})
    assert refused.status_code == 401 and "another PACS account" in refused.json()["detail"]
    assert "Basic" in refused.headers["www-authenticate"]
    forged = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    assert _stow(system, {"x-api-key": forged}).status_code == 401


def test_a_pacs_key_is_scoped(system, capsys):
    api_key = _mint_pacs(system, capsys, account="viewer", scopes="read")
    answer = _stow(system, {"x-api-key": api_key})
    assert answer.status_code == 403 and "upload" in answer.json()["detail"]
    with pytest.raises(SystemExit, match="PACS scopes must be among"):
        main(["token", "mint", "--kind", "pacs", "--account", "x", "--scopes", "admin",
              "--credentials", str(system.root / "other-credentials.json")])  # fmt: skip


def test_rotation_without_downtime_then_revocation(system, capsys):
    old = _mint_pacs(system, capsys, account="rotating")
    new = _mint_pacs(system, capsys, account="rotating")
    assert _stow(system, {"x-api-key": old}).status_code in (200, 202)
    assert _stow(system, {"x-api-key": new}).status_code in (200, 202)  # both, meanwhile
    credentials = system.encryptor_app.state.context.settings.pacs_credentials
    assert main(["token", "revoke", old, "--credentials", str(credentials)]) == 0
    refused = _stow(system, {"x-api-key": old})
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert _stow(system, {"x-api-key": new}).status_code in (200, 202)
    capsys.readouterr()
    assert main(["token", "inspect", old, "--credentials", str(credentials)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["account"] == "rotating" and report["valid"] is False and report["revoked"]


def test_signed_tokens_of_every_kind_mint_inspect_revoke(system, capsys, tmp_path, monkeypatch):
    secret = system.user_secret.hex()
    monkeypatch.setenv("PECBIR_ENCRYPTOR_USER_TOKEN_SECRET", secret)
    monkeypatch.setenv("PECBIR_TOKEN_SECRET", system.cloud_secret.hex())
    tokens = {}
    for kind, ttl in (("gateway", 86400), ("search", 60), ("encryptor", 3600)):
        assert main(["token", "mint", "--kind", kind, "--sub", f"{kind}-user", "--tenant",
                     system.tenant, "--scopes", "upload,read", "--ttl", str(ttl)]) == 0  # fmt: skip
        tokens[kind] = capsys.readouterr().out.strip()
        assert main(["token", "inspect", tokens[kind]]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["kind"] == kind and report["valid"] is True
        assert report["claims"]["sub"] == f"{kind}-user" and report["claims"]["jti"]
    # Too long a lifetime for the kind: refused, saying the limit.
    with pytest.raises(SystemExit, match="at most 43200"):
        main(["token", "mint", "--kind", "encryptor", "--sub", "u", "--tenant", "t",
              "--ttl", "100000"])  # fmt: skip

    # A revoked user token is refused by the running service on its next request.
    revoked = tmp_path / "revoked.jsonl"
    monkeypatch.setenv("PECBIR_REVOKED_TOKENS", str(revoked))
    user = {"authorization": f"Bearer {tokens['encryptor']}"}
    assert system.encryptor.get("/healthz", headers=user).json().get("authenticated") is not False
    status = system.encryptor.get("/v1/collections/brain/images/" + "0" * 32 + "/status",
                                  headers=user)  # fmt: skip
    assert status.status_code != 401
    assert main(["token", "revoke", tokens["encryptor"]]) == 0
    status = system.encryptor.get(
        "/v1/collections/brain/images/" + "0" * 32 + "/status", headers=user
    )
    assert status.status_code == 401 and "revoked" in status.json()["detail"]
    capsys.readouterr()
    assert main(["token", "inspect", tokens["encryptor"]]) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "token revoked"
    # Every token of a subject, by name (a leaked credential's holder).
    assert main(["token", "revoke", "--sub", "gateway-user", "--tenant", system.tenant]) == 0
    gateway = system.gateway.get(
        "/v1/collections/brain/model", headers={"authorization": f"Bearer {tokens['gateway']}"}
    )
    assert gateway.status_code == 401 and "revoked" in gateway.json()["detail"]


def test_openapi_declares_the_security_schemes(system):
    document = system.encryptor.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["pacsApiKey"] == {**schemes["pacsApiKey"], "in": "header", "name": "X-API-Key"}
    assert schemes["pacsBasic"]["scheme"] == "basic"
    stow = document["paths"]["/dicomweb/{collection}/studies"]["post"]
    assert {"pacsBasic": []} in stow["security"]
    assert document["paths"]["/healthz"]["get"]["security"] == [{}]
    gateway = system.gateway.get("/openapi.json").json()
    assert list(gateway["components"]["securitySchemes"]) == ["bearer"]
