"""The registry's server API against a real SMTP server (STARTTLS, implicit TLS, AUTH), on
SQLite and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import ACCOUNTS, Api, make_settings, running
from tests.support.smtp import SmtpTestServer, closed_port, silent_server, unanswered_port


def server_body(
    smtp: SmtpTestServer, login: str = "alice@example.com", **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "host": "localhost",
        "port": smtp.port,
        "security": smtp.security,
        "username": login,
        "password": ACCOUNTS[login],
        "from_email": login,
        "from_name": "Alice",
        "label": "primary",
    }
    body.update(extra)
    return body


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["code"] == code, problem
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    return problem


async def test_starttls_server_with_good_credentials_is_stored_active(
    api: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    logins_before = starttls_server.recorder.logins["alice@example.com"]
    response = await api.client.post(
        "/v1/servers", json=server_body(starttls_server), headers=tenant
    )
    assert response.status_code == 201, response.text
    server = response.json()
    assert server["status"] == "active"
    assert server["has_password"] is True
    assert "password" not in server
    assert server["last_check"]["ok"] is True
    assert starttls_server.recorder.logins["alice@example.com"] == logins_before + 1
    assert not starttls_server.recorder.messages, "a check must never send an email"

    fetched = await api.client.get(f"/v1/servers/{server['id']}", headers=tenant)
    assert fetched.json() == server


async def test_implicit_tls_server_is_stored_active(api: Api, tls_server: SmtpTestServer) -> None:
    tenant = await api.new_tenant()
    response = await api.client.post("/v1/servers", json=server_body(tls_server), headers=tenant)
    assert response.status_code == 201, response.text
    assert response.json()["security"] == "tls"


async def test_host_is_lowercased_and_username_trimmed_and_lowercased(
    api: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    body = server_body(starttls_server, host="LocalHost")
    body["username"] = " ALICE@example.com "
    response = await api.client.post("/v1/servers", json=body, headers=tenant)
    assert response.status_code == 201, response.text
    assert response.json()["host"] == "localhost"
    assert response.json()["username"] == "alice@example.com"
    # A host with spaces is outside the spec's pattern, so it is refused, not trimmed.
    spaced = server_body(starttls_server, host=" localhost ")
    refused = await api.client.post("/v1/servers", json=spaced, headers=tenant)
    assert refused.status_code == 422, refused.text
    assert [e["field"] for e in refused.json()["errors"]] == ["body.host"]


async def test_wrong_password_is_auth_failed_and_nothing_is_stored(
    api: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    body = server_body(starttls_server, password="not-the-password")
    problem = assert_problem(
        await api.client.post("/v1/servers", json=body, headers=tenant), 422, "auth_failed"
    )
    assert "535" in problem["detail"]
    assert problem["hint"]
    listing = await api.client.get("/v1/servers", headers=tenant)
    assert listing.json()["items"] == []


async def test_tls_on_a_starttls_port_is_tls_failed_with_a_hint(
    api: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    body = server_body(starttls_server, security="tls")
    problem = assert_problem(
        await api.client.post("/v1/servers", json=body, headers=tenant), 422, "tls_failed"
    )
    assert "starttls" in problem["hint"]


async def test_untrusted_certificate_is_tls_failed(
    api: Api, starttls_server: SmtpTestServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import trustme

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
    tenant = await api.new_tenant()
    problem = assert_problem(
        await api.client.post("/v1/servers", json=server_body(starttls_server), headers=tenant),
        422,
        "tls_failed",
    )
    assert "certificate" in problem["detail"]


async def test_closed_port_is_connect_failed(api: Api) -> None:
    tenant = await api.new_tenant()
    body = {
        "host": "127.0.0.1",
        "port": closed_port(),
        "security": "starttls",
        "username": "a@example.net",
        "password": "x",
        "from_email": "a@example.net",
    }
    assert_problem(
        await api.client.post("/v1/servers", json=body, headers=tenant), 422, "connect_failed"
    )


async def test_silent_server_times_out_within_the_bound(database_url: str) -> None:
    settings = make_settings(database_url, verify_timeout_seconds=1.5)
    async with running(settings) as api:
        tenant = await api.new_tenant()
        with silent_server() as port:
            body = {
                "host": "127.0.0.1",
                "port": port,
                "security": "starttls",
                "username": "a@example.net",
                "password": "x",
                "from_email": "a@example.net",
            }
            started = time.monotonic()
            response = await api.client.post("/v1/servers", json=body, headers=tenant)
            elapsed = time.monotonic() - started
    assert_problem(response, 422, "timeout")
    assert 1.0 <= elapsed <= 1.5 + 0.5  # within the configured bound, not later


async def test_same_host_and_username_twice_is_409(
    api: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    first = await api.client.post("/v1/servers", json=server_body(starttls_server), headers=tenant)
    assert first.status_code == 201
    again = server_body(starttls_server, username="ALICE@EXAMPLE.COM")
    again["username"] = "ALICE@example.com"
    assert_problem(
        await api.client.post("/v1/servers", json=again, headers=tenant), 409, "server_exists"
    )
    # Another tenant may add the same login: servers are never shared, so nothing collides.
    other = await api.new_tenant("other")
    response = await api.client.post(
        "/v1/servers", json=server_body(starttls_server), headers=other
    )
    assert response.status_code == 201


async def test_preset_fills_host_port_and_security(api: Api) -> None:
    from services.registry.models import SmtpServerCreate

    body = SmtpServerCreate(
        preset="gmail",  # type: ignore[arg-type]
        username="x@gmail.com",
        password="p",  # type: ignore[arg-type]
        from_email="x@gmail.com",
    )
    assert (body.host, body.port, body.security) == ("smtp.gmail.com", 587, "starttls")
    tenant = await api.new_tenant()
    problem = assert_problem(
        await api.client.post(
            "/v1/servers",
            headers=tenant,
            json={"preset": "nope", "username": "x", "password": "p", "from_email": "x@gmail.com"},
        ),
        422,
        "validation_failed",
    )
    assert problem["errors"][0]["field"] == "body.preset"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"port": 70000}, "body.port"),
        ({"security": "none"}, "body.security"),
        ({"from_email": "not-an-address"}, "body.from_email"),
        ({"from_name": "Evil\r\nBcc: victim@example.com"}, "body.from_name"),
        ({"username": "a\nb"}, "body.username"),
        ({"password": "pa\r\nss"}, "body.password"),
        ({"daily_cap": 10_001}, "body.daily_cap"),
        ({"host": None, "port": None}, "body.host"),
    ],
)
async def test_bad_input_names_the_field_and_stores_nothing(
    api: Api, starttls_server: SmtpTestServer, patch: dict[str, Any], field: str
) -> None:
    tenant = await api.new_tenant()
    body = server_body(starttls_server)
    for key, value in patch.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    response = await api.client.post("/v1/servers", json=body, headers=tenant)
    problem = assert_problem(response, 422, "validation_failed")
    assert field in [error["field"] for error in problem["errors"]]
    assert "pa\r\nss" not in response.text
    assert (await api.client.get("/v1/servers", headers=tenant)).json()["items"] == []


async def test_list_is_cursor_paginated(api: Api, starttls_server: SmtpTestServer) -> None:
    tenant = await api.new_tenant()
    created = []
    for login in ACCOUNTS:
        response = await api.client.post(
            "/v1/servers", json=server_body(starttls_server, login), headers=tenant
        )
        created.append(response.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await api.client.get("/v1/servers", params=params, headers=tenant)).json()
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created
    # A cursor not of the documented shape is a validation error naming the parameter.
    garbage = assert_problem(
        await api.client.get("/v1/servers", params={"cursor": "garbage!"}, headers=tenant),
        422,
        "validation_failed",
    )
    assert [e["field"] for e in garbage["errors"]] == ["query.cursor"]


async def test_patch_rechecks_changed_credentials_before_saving(
    api: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    server = (
        await api.client.post("/v1/servers", json=server_body(starttls_server), headers=tenant)
    ).json()
    url = f"/v1/servers/{server['id']}"

    renamed = await api.client.patch(
        url, json={"label": "renamed", "daily_cap": 200}, headers=tenant
    )
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["label"], renamed.json()["daily_cap"]) == ("renamed", 200)

    bad = await api.client.patch(url, json={"password": "wrong"}, headers=tenant)
    assert_problem(bad, 422, "auth_failed")
    still = (await api.client.get(url, headers=tenant)).json()
    assert still["status"] == "active"
    creds = await api.client.get(
        f"/internal/v1/servers/{server['id']}/credentials", headers=api.internal()
    )
    assert creds.json()["password"] == ACCOUNTS["alice@example.com"]

    switched = await api.client.patch(
        url,
        json={"username": "bob@example.com", "password": ACCOUNTS["bob@example.com"]},
        headers=tenant,
    )
    assert switched.status_code == 200, switched.text
    assert switched.json()["username"] == "bob@example.com"
    creds = await api.client.get(
        f"/internal/v1/servers/{server['id']}/credentials", headers=api.internal()
    )
    assert creds.json()["password"] == ACCOUNTS["bob@example.com"]


async def test_verify_pause_resume_and_delete(api: Api, starttls_server: SmtpTestServer) -> None:
    tenant = await api.new_tenant()
    login = "carol@example.com"
    server = (
        await api.client.post(
            "/v1/servers", json=server_body(starttls_server, login), headers=tenant
        )
    ).json()
    url = f"/v1/servers/{server['id']}"

    paused = await api.client.post(f"{url}/pause", headers=tenant)
    assert paused.json()["status"] == "paused"
    resumed = await api.client.post(f"{url}/resume", headers=tenant)
    assert resumed.json()["status"] == "active"

    # The password is changed at the provider: verify reports it and keeps the reply.
    starttls_server.recorder.accounts[login] = "rotated-at-provider"
    try:
        verified = await api.client.post(f"{url}/verify", headers=tenant)
        assert verified.status_code == 200, verified.text
        body = verified.json()
        assert body["status"] == "auth_failed"
        assert body["last_check"]["code"] == "auth_failed"
        assert "535" in body["last_check"]["reply"]
        assert (await api.client.get(url, headers=tenant)).json()["status"] == "auth_failed"
    finally:
        starttls_server.recorder.accounts[login] = ACCOUNTS[login]
    assert (await api.client.post(f"{url}/verify", headers=tenant)).json()["status"] == "active"

    assert (await api.client.delete(url, headers=tenant)).status_code == 204
    assert_problem(await api.client.get(url, headers=tenant), 404, "server_not_found")


async def test_checks_are_rate_limited_per_tenant(database_url: str) -> None:
    settings = make_settings(database_url, verify_rate_per_minute=1, verify_burst=2)
    async with running(settings) as api:
        tenant = await api.new_tenant()
        other = await api.new_tenant("other")
        body = {
            "host": "127.0.0.1",
            "port": closed_port(),
            "security": "starttls",
            "username": "a@example.net",
            "password": "x",
            "from_email": "a@example.net",
        }
        codes = [
            (await api.client.post("/v1/servers", json=body, headers=tenant)).status_code
            for _ in range(3)
        ]
        assert codes == [422, 422, 429]
        limited = await api.client.post("/v1/servers", json=body, headers=tenant)
        problem = assert_problem(limited, 429, "rate_limited")
        assert int(limited.headers["Retry-After"]) >= 1
        assert problem["hint"]
        # Another tenant has its own budget.
        other_response = await api.client.post("/v1/servers", json=body, headers=other)
        assert other_response.status_code == 422


async def test_unanswered_handshake_looks_like_a_closed_port(database_url: str) -> None:
    settings = make_settings(database_url, verify_timeout_seconds=1.5)
    async with running(settings) as api:
        tenant = await api.new_tenant()
        closed = {**UNREACHABLE_BODY, "port": closed_port()}
        with unanswered_port() as port:
            filtered = {**UNREACHABLE_BODY, "port": port}
            started = time.monotonic()
            dropped = await api.client.post("/v1/servers", json=filtered, headers=tenant)
            elapsed = time.monotonic() - started
        refused = await api.client.post("/v1/servers", json=closed, headers=tenant)
    assert_problem(dropped, 422, "connect_failed")
    # Bounded by the check's own timeout, not the system's connect timeout (minutes); the
    # margin covers a request's own cost on a loaded machine.
    assert elapsed < settings.verify_timeout_seconds + 2.5
    # Same code, same words: the check cannot tell a scanner which ports are filtered.
    assert {k: v for k, v in dropped.json().items() if k != "instance"} == {
        k: v for k, v in refused.json().items() if k != "instance"
    }


UNREACHABLE_BODY = {
    "host": "127.0.0.1",
    "security": "starttls",
    "username": "a@example.net",
    "password": "x",
    "from_email": "a@example.net",
}
