"""Every path template of contracts.routes is served, and each service serves only those."""

from __future__ import annotations

import httpx
import pytest

from pecbir_contracts import routes

SECRET = "0123456789abcdef-routes-test-secret"


def templates(prefix: str) -> set[str]:
    return {value for name, value in vars(routes).items() if name.startswith(prefix)}


def served_paths(app) -> set[str]:
    return set(app.openapi()["paths"]) - {routes.HEALTHZ}


@pytest.fixture
def apps(tmp_path):
    from pecbir_encryptor.app import create_app as encryptor_app
    from pecbir_encryptor.settings import EncryptorSettings
    from pecbir_gateway.app import create_app as gateway_app
    from pecbir_gateway.dispatch import CallableDispatcher
    from pecbir_gateway.settings import GatewaySettings
    from pecbir_platform.store import FilesystemStore
    from pecbir_search.app import create_app as search_app
    from pecbir_search.settings import SearchSettings
    from pecore.keys import MasterKey

    store = FilesystemStore(tmp_path / "store")
    unused = httpx.Client(base_url="http://unused")
    return {
        "GATEWAY_": gateway_app(
            GatewaySettings(token_secret=SECRET),
            store=store,
            dispatcher=CallableDispatcher(lambda _name, _args: None),
            search_client=unused,
        ),
        "SEARCH_": search_app(SearchSettings(token_secret=SECRET, follow=False), store=store),
        "ENCRYPTOR_": encryptor_app(
            EncryptorSettings(
                tenant="hosp-a",
                master_key=tmp_path / "unused.key",
                gateway_token="unused",
                user_token_secret=SECRET,
                audit_log=tmp_path / "audit.jsonl",
            ),
            master=MasterKey.from_seed(1),
            gateway_client=unused,
        ),
    }


@pytest.mark.parametrize("prefix", ["GATEWAY_", "SEARCH_", "ENCRYPTOR_"])
def test_each_service_serves_exactly_its_route_templates(apps, prefix):
    assert served_paths(apps[prefix]) == templates(prefix)


def test_templates_fill_in_with_their_parameters_only():
    assert (
        routes.GATEWAY_IMAGE_CIPHER.format(collection="brain", image_id="ab" * 16)
        == "/v1/collections/brain/images/" + "ab" * 16 + "/cipher"
    )
    with pytest.raises(KeyError):
        routes.SEARCH_STATUS.format(owner="hosp-a")
