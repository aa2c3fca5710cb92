"""The committed OpenAPI spec matches the app; public and internal routes have their own specs.
Schemathesis with every check runs in tests/test_schemathesis.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.openapi import SPEC_DIR, render, specs
from shared.migrate import upgrade_database
from tests.conftest import make_settings


@pytest.mark.parametrize("name", sorted(specs()))
def test_committed_spec_matches_the_app(name: str) -> None:
    committed = (SPEC_DIR / f"{name}.json").read_text()
    assert json.loads(render(specs()[name])) == json.loads(committed), (
        f"openapi/{name}.json is stale: run `make openapi` and commit the result"
    )


PUBLIC_SPECS = ("api", "registry", "scheduler", "webhooks")


@pytest.mark.parametrize("name", PUBLIC_SPECS)
def test_public_specs_list_only_public_routes(name: str) -> None:
    paths = json.loads((SPEC_DIR / f"{name}.json").read_text())["paths"]
    assert paths
    assert [path for path in paths if path.startswith("/internal")] == []


def test_internal_routes_have_their_own_spec() -> None:
    paths = json.loads((SPEC_DIR / "internal.json").read_text())["paths"]
    assert paths
    assert all(path.startswith("/internal/v1/") for path in paths)
    assert "/internal/v1/servers/{server_id}/credentials" in paths


def test_the_one_process_app_serves_internal_routes_without_advertising_them(
    registry_client: TestClient,
) -> None:
    served = registry_client.get(
        "/internal/v1/servers/01900000-0000-7000-8000-000000000000/credentials"
    )
    # Served, and behind the internal token: 401, not 404.
    assert served.status_code == 401
    assert served.json()["code"] == "unauthorized"
    advertised = registry_client.get("/openapi.json").json()["paths"]
    assert not [path for path in advertised if path.startswith("/internal")]


def _registry_app(tmp: Path) -> TestClient:
    url = f"sqlite:///{tmp / 'fuzz.db'}"
    upgrade_database(url)
    # Private hosts stay forbidden so fuzzed hosts are refused before any connection.
    app = create_app(
        make_settings(url, allow_private_hosts=False, verify_timeout_seconds=1.0),
        run_loops=False,
    )
    return TestClient(app)


@pytest.fixture(scope="module")
def registry_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with _registry_app(tmp_path_factory.mktemp("fuzz")) as client:
        yield client


@pytest.fixture(scope="module")
def auth_headers(registry_client: TestClient) -> dict[str, str]:
    app_settings = registry_client.app.state.settings  # type: ignore[attr-defined]
    response = registry_client.post(
        "/v1/tenants",
        json={"name": "fuzz"},
        headers={"Authorization": f"Bearer {app_settings.admin_token.get_secret_value()}"},
    )
    return {"Authorization": f"Bearer {response.json()['api_key']}"}


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/messages", "GET, POST"),
        ("/v1/sending-profile", "GET, PUT"),
        ("/v1/servers/01900000-0000-7000-8000-000000000000", "DELETE, GET, PATCH"),
    ],
)
def test_405_allows_every_method_of_the_path(
    registry_client: TestClient, path: str, allowed: str
) -> None:
    # Each method is a route of its own; Starlette's 405 named only the first one's methods.
    response = registry_client.request("OPTIONS", path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["code"] == "method_not_allowed"


def test_a_body_that_is_not_utf8_is_a_documented_400(
    registry_client: TestClient, auth_headers: dict[str, str]
) -> None:
    response = registry_client.post(
        "/v1/servers",
        content=b"\xff\xfe{",
        headers=auth_headers | {"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "malformed_body"
    documented = json.loads((SPEC_DIR / "api.json").read_text())["paths"]["/v1/servers"]["post"]
    assert "application/problem+json" in documented["responses"]["400"]["content"]


def test_an_unknown_query_parameter_is_refused_without_echo(
    registry_client: TestClient, auth_headers: dict[str, str]
) -> None:
    # The spec lists each operation's query parameters; a typo is reported, not dropped.
    response = registry_client.get("/v1/servers?staus=queued&limit=5", headers=auth_headers)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "unknown_query_parameter"
    assert "staus" not in response.text
    assert registry_client.get("/v1/servers?limit=5", headers=auth_headers).status_code == 200
