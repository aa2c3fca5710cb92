"""The committed OpenAPI spec matches the app; public and internal routes have their own specs.
Schemathesis with every check runs in tests/test_schemathesis.py."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

from services.app import create_app
from services.openapi import SPEC_DIR, render, specs
from services.registry.domain import CheckCode
from shared.errors import AppError
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


# --- What a client generator needs (issue 15) ---

SPECS = {name: json.loads((SPEC_DIR / f"{name}.json").read_text()) for name in specs()}
OPERATIONS = [
    (name, path, method, operation)
    for name in ("api", "internal")
    for path, item in SPECS[name]["paths"].items()
    for method, operation in item.items()
]
IDS = [f"{method.upper()} {path}" for _, path, method, _ in OPERATIONS]


def _problem_classes() -> dict[str, type[AppError]]:
    """Every code of shared/errors.py's hierarchy, by the class that declares it."""
    found: dict[str, type[AppError]] = {}
    pending: list[type[AppError]] = [AppError]
    while pending:
        error = pending.pop()
        pending += error.__subclasses__()
        for code in error.documented_codes():
            found.setdefault(code, error)
    return found


def test_operation_ids_are_readable_and_unique_across_the_public_and_internal_specs() -> None:
    ids = [operation["operationId"] for *_, operation in OPERATIONS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)*", i) for i in ids), ids
    named = {(path, method): op["operationId"] for _, path, method, op in OPERATIONS}
    assert {
        named[("/v1/servers", "get")],
        named[("/v1/servers", "post")],
        named[("/v1/servers/{server_id}", "get")],
        named[("/v1/servers/{server_id}", "patch")],
        named[("/v1/servers/{server_id}", "delete")],
        named[("/v1/messages", "post")],
        named[("/v1/messages", "get")],
        named[("/v1/servers/{server_id}/warmup", "get")],
        named[("/v1/tenants", "post")],
        named[("/v1/suppressions", "get")],
        named[("/v1/webhooks", "post")],
        named[("/internal/v1/servers/{server_id}/credentials", "get")],
    } == {
        "listServers",
        "addServer",
        "getServer",
        "updateServer",
        "deleteServer",
        "acceptMessages",
        "listMessages",
        "getWarmup",
        "createTenant",
        "listSuppressions",
        "createWebhook",
        "getServerCredentials",
    }


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_per_service_specs_name_operations_as_the_combined_one(name: str) -> None:
    combined = {
        (path, method): op["operationId"]
        for spec in (SPECS["api"], SPECS["internal"])
        for path, item in spec["paths"].items()
        for method, op in item.items()
    }
    for path, item in SPECS[name]["paths"].items():
        for method, op in item.items():
            assert op["operationId"] == combined[(path, method)]


@pytest.mark.parametrize(("name", "path", "method", "operation"), OPERATIONS, ids=IDS)
def test_each_operation_has_one_described_tag_a_summary_and_a_description(
    name: str, path: str, method: str, operation: dict[str, Any]
) -> None:
    assert len(operation["tags"]) == 1
    declared = {tag["name"]: tag["description"] for tag in SPECS[name]["tags"]}
    assert declared[operation["tags"][0]]
    assert operation["summary"].strip()
    assert len(operation["description"].strip()) > 20


def _validator(name: str, schema: dict[str, Any]) -> Draft202012Validator:
    # The spec's components beside the schema, so that its `#/components/...` refs resolve.
    root = {"components": SPECS[name]["components"], "allOf": [schema]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize(("name", "path", "method", "operation"), OPERATIONS, ids=IDS)
def test_each_error_is_a_problem_whose_code_enum_comes_from_the_error_classes(
    name: str, path: str, method: str, operation: dict[str, Any]
) -> None:
    classes = _problem_classes()
    errors = {s: r for s, r in operation["responses"].items() if s[0] in "45"}
    if path != "/healthz":
        assert errors
    for status, response in errors.items():
        assert list(response["content"]) == ["application/problem+json"]
        media = response["content"]["application/problem+json"]
        problem, narrowed = media["schema"]["allOf"]
        assert problem == {"$ref": "#/components/schemas/Problem"}
        codes = narrowed["properties"]["code"]["enum"]
        assert narrowed["required"] == ["code"]
        for code in codes:
            assert int(classes[code].status) == int(status), code
        # One example per code, each a valid answer of this operation.
        assert sorted(media["examples"]) == sorted(codes)
        validator = _validator(name, media["schema"])
        for code, example in media["examples"].items():
            assert example["value"]["code"] == code
            assert example["value"]["status"] == int(status)
            validator.validate(example["value"])
        stranger = dict(next(iter(media["examples"].values()))["value"], code="not_a_code")
        assert not validator.is_valid(stranger)


def test_codes_an_operation_raises_are_in_its_enum() -> None:
    """Spot checks of the derivation: the route's own errors, its dependencies' (the API key,
    the rate limiter, the query check) and the framework's (a body, a path parameter)."""
    responses = SPECS["api"]["paths"]["/v1/servers"]["post"]["responses"]

    def codes(status: str) -> list[str]:
        schema = responses[status]["content"]["application/problem+json"]["schema"]
        enum: list[str] = schema["allOf"][1]["properties"]["code"]["enum"]
        return enum

    assert codes("401") == ["unauthorized"]
    assert codes("409") == ["server_exists"]
    assert codes("429") == ["rate_limited"]
    assert codes("400") == ["malformed_body"]
    assert codes("413") == ["body_too_large"]
    assert {"validation_failed", "unknown_query_parameter", "password_required"} - set(
        codes("422")
    ) == {"password_required"}
    assert {c.value for c in CheckCode} <= set(codes("422"))
    assert "Retry-After" in responses["429"]["headers"]
    assert "404" not in responses  # no path parameter, no id to miss
    warmup = SPECS["api"]["paths"]["/v1/servers/{server_id}/warmup"]["get"]["responses"]
    schema = warmup["404"]["content"]["application/problem+json"]["schema"]
    assert schema["allOf"][1]["properties"]["code"]["enum"] == ["not_found", "server_not_found"]


def _examples(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any], Any]]:
    found = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            bodies = [operation.get("requestBody", {}).get("content", {})]
            bodies += [r.get("content", {}) for r in operation["responses"].values()]
            for content in bodies:
                for media in content.values():
                    values = [e["value"] for e in media.get("examples", {}).values()]
                    values += [media["example"]] if "example" in media else []
                    found += [(f"{method} {path}", media["schema"], v) for v in values]
    return found


def test_every_example_is_valid_against_its_schema() -> None:
    examples = _examples(SPECS["api"])
    where = {place for place, _, _ in examples}
    # A Gmail preset server, a batch of emails, the answers a frontend reads first.
    assert {
        "post /v1/servers",
        "post /v1/messages",
        "post /v1/tenants",
        "get /v1/servers/{server_id}/warmup",
    } <= where
    for place, schema, value in examples:
        errors = [e.message for e in _validator("api", schema).iter_errors(value)]
        assert not errors, (place, errors)
    batch = SPECS["api"]["paths"]["/v1/messages"]["post"]["requestBody"]["content"]
    assert len(batch["application/json"]["examples"]["batch"]["value"]["messages"]) > 1
    gmail = SPECS["api"]["paths"]["/v1/servers"]["post"]["requestBody"]["content"]
    assert gmail["application/json"]["examples"]["gmail"]["value"]["preset"] == "gmail"


@pytest.mark.parametrize(("name", "path", "method", "operation"), OPERATIONS, ids=IDS)
def test_pagination_is_documented_where_an_operation_pages(
    name: str, path: str, method: str, operation: dict[str, Any]
) -> None:
    params = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}
    ok = operation["responses"].get("200", {}).get("content", {}).get("application/json", {})
    ref = ok.get("schema", {}).get("$ref", "")
    pages = ref.endswith("Page")
    assert pages == ("cursor" in params)
    if pages:
        assert params["cursor"]["description"]
        assert params["limit"]["description"]
        assert "next_cursor" in operation["description"]
        page = SPECS[name]["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert "next_cursor" in page["properties"]
        enum = operation["responses"]["422"]["content"]["application/problem+json"]["schema"]
        assert "invalid_cursor" in enum["allOf"][1]["properties"]["code"]["enum"]


def test_idempotency_is_documented_on_the_messages_route() -> None:
    # Per email, by `idempotency_key` in the body (the route takes no Idempotency-Key header).
    operation = SPECS["api"]["paths"]["/v1/messages"]["post"]
    assert "idempotency_key" in operation["description"]
    conflict = operation["responses"]["409"]["content"]["application/problem+json"]["schema"]
    assert conflict["allOf"][1]["properties"]["code"]["enum"] == [
        "duplicate_idempotency_key",
        "idempotency_conflict",
    ]
    email = SPECS["api"]["components"]["schemas"]["EmailCreate"]
    assert "idempotency_key" in email["properties"]
    assert email["properties"]["idempotency_key"].get("description")


def test_no_error_code_is_spelled_where_it_is_raised() -> None:
    """Codes live on the error classes (or the enums they come from), which the spec's enums
    are built from: a `code="..."` literal at a raise site would be a code no spec lists."""
    root = Path(__file__).resolve().parent.parent
    spelled = [
        f"{path.relative_to(root)}:{node.lineno}"
        for folder in ("shared", "services")
        for path in (root / folder).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "code"
        and isinstance(keyword.value, ast.Constant)
        and isinstance(keyword.value.value, str)
    ]
    assert spelled == []


def test_every_public_operation_documents_the_gateways_503() -> None:
    """The gateway answers `upstream_unavailable` for any /v1 path whose service is away; a
    client generated from the spec must know that answer."""
    for name, path, method, operation in OPERATIONS:
        answer = operation["responses"].get("503", {})
        schema = answer.get("content", {}).get("application/problem+json", {}).get("schema", {})
        documented = "upstream_unavailable" in json.dumps(schema)
        assert documented == (name == "api" and path.startswith("/v1/")), (name, path, method)
