"""The requests clients/typescript/usage.ts makes, from Python, against the one-process app (SQLite,
a real aiosmtpd server with STARTTLS and AUTH): create a tenant, add a server, send a batch, read
the warmup, list the campaign, and provoke problems. Each request body is checked against the
committed spec's request schema and each response against the response schema of its
operationId and status (jsonschema, JSON Schema 2020-12, the dialect of OpenAPI 3.1), so the
spec a frontend generates its client from is the API it gets."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from services.openapi import SPEC_DIR
from shared.settings import Settings
from tests.conftest import ACCOUNTS, Api, make_settings, running
from tests.support.smtp import SmtpTestServer

SPEC: dict[str, Any] = json.loads((SPEC_DIR / "api.json").read_text())
LOGIN = "alice@example.com"


def operation(operation_id: str) -> tuple[str, str, dict[str, Any]]:
    found = [
        (path, method, op)
        for path, item in SPEC["paths"].items()
        for method, op in item.items()
        if op["operationId"] == operation_id
    ]
    assert len(found) == 1, f"{operation_id}: {len(found)} operations"
    return found[0]


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    # The spec's components beside the schema, so that its `#/components/...` refs resolve.
    root = {"components": SPEC["components"], "allOf": [schema]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def errors_of(schema: dict[str, Any], value: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator(schema).iter_errors(value)]


class Contract:
    """Calls operations by operationId, as a generated client does, and holds every answer to
    the spec."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.seen: list[tuple[str, int]] = []

    async def call(
        self,
        operation_id: str,
        headers: dict[str, str],
        *,
        path: dict[str, str] | None = None,
        query: dict[str, Any] | None = None,
        body: Any = None,
        valid: bool = True,
    ) -> httpx.Response:
        """`valid=False`: a body the spec refuses, sent to see the refusal."""
        template, method, op = operation(operation_id)
        if body is not None:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            assert bool(errors_of(schema, body)) is not valid, errors_of(schema, body)
        response = await self.client.request(
            method.upper(),
            template.format(**(path or {})),
            params=query,
            json=body,
            headers=headers,
        )
        self.check(operation_id, response)
        return response

    def check(self, operation_id: str, response: httpx.Response) -> None:
        _, _, op = operation(operation_id)
        status = str(response.status_code)
        assert status in op["responses"], f"{operation_id} answered {status}: {response.text}"
        self.seen.append((operation_id, response.status_code))
        documented = op["responses"][status]
        if "content" not in documented:
            assert response.content == b""
            return
        media = response.headers["content-type"].split(";")[0]
        assert media in documented["content"], (operation_id, status, media)
        problems = errors_of(documented["content"][media]["schema"], response.json())
        assert not problems, (operation_id, status, problems)


@pytest.fixture
async def app(sqlite_url: str) -> AsyncIterator[Api]:
    settings: Settings = make_settings(sqlite_url)
    async with running(settings, combined=True) as api:
        yield api


def gmail_server(smtp: SmtpTestServer, password: str) -> dict[str, Any]:
    # As usage.ts's addGmailServer: the Gmail preset, its endpoint pointed at the test server.
    return {
        "preset": "gmail",
        "host": "localhost",
        "port": smtp.port,
        "security": "starttls",
        "username": LOGIN,
        "password": password,
        "from_email": LOGIN,
        "from_name": "Acme Sales",
        "label": "Sales 1",
    }


def batch(campaign: str, recipients: list[str]) -> dict[str, Any]:
    # As usage.ts's sendBatch.
    return {
        "messages": [
            {
                "to": to,
                "subject": "Hello from Acme",
                "text": "Hi, a short note from Acme.",
                "campaign": campaign,
                "idempotency_key": f"{campaign}-{index}",
            }
            for index, to in enumerate(recipients)
        ]
    }


async def test_the_usage_files_requests_get_what_the_spec_promises(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    contract = Contract(app.client)

    created = await contract.call("createTenant", app.admin(), body={"name": "Acme"})
    assert created.status_code == 201
    tenant = {"Authorization": f"Bearer {created.json()['api_key']}"}

    added = await contract.call(
        "addServer", tenant, body=gmail_server(starttls_server, ACCOUNTS[LOGIN])
    )
    assert added.status_code == 201, added.text
    server_id = added.json()["id"]
    assert added.json()["status"] == "active"

    recipients = [f"lead{n}@example.org" for n in range(3)]
    sent = await contract.call("acceptMessages", tenant, body=batch("november", recipients))
    assert sent.status_code == 202
    assert sent.json()["queued"] == 3
    # The same batch again (a retry after a timeout): nothing queued twice.
    again = await contract.call("acceptMessages", tenant, body=batch("november", recipients))
    assert (again.json()["queued"], again.json()["duplicates"]) == (0, 3)
    assert again.json()["ids"] == sent.json()["ids"]

    warmup = await contract.call("getWarmup", tenant, path={"server_id": server_id})
    assert warmup.status_code == 200
    assert warmup.json()["allowance_today"] > 0
    assert len(warmup.json()["projection"]) == 30

    listed = await contract.call("listMessages", tenant, query={"campaign": "november", "limit": 2})
    assert len(listed.json()["items"]) == 2
    cursor = listed.json()["next_cursor"]
    rest = await contract.call(
        "listMessages", tenant, query={"campaign": "november", "limit": 2, "cursor": cursor}
    )
    assert (len(rest.json()["items"]), rest.json()["next_cursor"]) == (1, None)

    assert ("getServer", 200) not in contract.seen
    await contract.call("getServer", tenant, path={"server_id": server_id})
    await contract.call("listServers", tenant)


async def test_problems_carry_a_code_the_operation_lists(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    contract = Contract(app.client)

    refused = await contract.call("createTenant", {}, body={"name": "Acme"})
    assert (refused.status_code, refused.json()["code"]) == (401, "unauthorized")
    tenant = await app.new_tenant()

    # The real SMTP server refuses the password: the check's code, nothing stored.
    wrong = await contract.call("addServer", tenant, body=gmail_server(starttls_server, "nope"))
    assert (wrong.status_code, wrong.json()["code"]) == (422, "auth_failed")
    assert wrong.headers["content-type"] == "application/problem+json"
    assert (await app.client.get("/v1/servers", headers=tenant)).json()["items"] == []

    body = gmail_server(starttls_server, ACCOUNTS[LOGIN])
    assert (await contract.call("addServer", tenant, body=body)).status_code == 201
    twice = await contract.call("addServer", tenant, body=body)
    assert (twice.status_code, twice.json()["code"]) == (409, "server_exists")

    invalid = await contract.call("addServer", tenant, body={**body, "port": 70000}, valid=False)
    assert (invalid.status_code, invalid.json()["code"]) == (422, "validation_failed")
    assert [e["field"] for e in invalid.json()["errors"]] == ["body.port"]

    missing = await contract.call("getWarmup", tenant, path={"server_id": str(uuid.uuid4())})
    assert (missing.status_code, missing.json()["code"]) == (404, "server_not_found")

    doubled = batch("december", ["a@example.org", "b@example.org"])
    doubled["messages"][1]["idempotency_key"] = doubled["messages"][0]["idempotency_key"]
    clash = await contract.call("acceptMessages", tenant, body=doubled)
    assert (clash.status_code, clash.json()["code"]) == (409, "duplicate_idempotency_key")

    typo = await contract.call("listMessages", tenant, query={"campgain": "x"})
    assert (typo.status_code, typo.json()["code"]) == (422, "unknown_query_parameter")


def test_the_contract_check_refuses_a_code_the_operation_does_not_list() -> None:
    """The check above can fail: a problem with another operation's code, or none, is not a
    valid answer of addServer's 409."""
    _, _, op = operation("addServer")
    schema = op["responses"]["409"]["content"]["application/problem+json"]["schema"]
    answer = {
        "type": "/problems/server_exists",
        "title": "Conflict",
        "status": 409,
        "detail": "This tenant already has a server with this host and username.",
        "code": "server_exists",
    }
    assert errors_of(schema, answer) == []
    assert errors_of(schema, {**answer, "code": "email_not_found"})
    assert errors_of(schema, {k: v for k, v in answer.items() if k != "code"})
