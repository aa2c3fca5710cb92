"""Tenant isolation, secrets that never leak, key rotation, service tokens and settings."""

from __future__ import annotations

import base64
import logging
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from services.registry.keys import rotate_keys
from services.registry.models import SmtpServer
from shared.crypto import DecryptionError, Keyring, associated_data, generate_key
from shared.db import create_engine, session_factory
from shared.settings import DEVELOPMENT_UNSUBSCRIBE_KEY, Settings, SettingsError, decode_key
from tests.conftest import Api, make_settings, running
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server

TENANT_ROUTES = [
    ("GET", "/v1/servers/{id}", None),
    ("PATCH", "/v1/servers/{id}", {"label": "mine now"}),
    ("PATCH", "/v1/servers/{id}", {"password": "hijack"}),
    ("DELETE", "/v1/servers/{id}", None),
    ("POST", "/v1/servers/{id}/verify", None),
    ("POST", "/v1/servers/{id}/pause", None),
    ("POST", "/v1/servers/{id}/resume", None),
]


async def add_server(
    api: Api,
    tenant: dict[str, str],
    smtp: SmtpTestServer,
    login: str = "alice@example.com",
    password: str | None = None,
) -> Any:
    body = {
        "host": "localhost",
        "port": smtp.port,
        "security": smtp.security,
        "username": login,
        "password": password or smtp.recorder.accounts[login],
        "from_email": login,
    }
    response = await api.client.post("/v1/servers", json=body, headers=tenant)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize(("method", "path", "body"), TENANT_ROUTES)
async def test_another_tenants_server_is_404_on_every_route(
    api: Api, starttls_server: SmtpTestServer, method: str, path: str, body: Any
) -> None:
    owner = await api.new_tenant("owner")
    intruder = await api.new_tenant("intruder")
    server = await add_server(api, owner, starttls_server)
    response = await api.client.request(
        method, path.format(id=server["id"]), json=body, headers=intruder
    )
    assert response.status_code == 404, response.text
    assert response.json()["code"] == "server_not_found"
    # The same answer as for an id that exists nowhere: nothing tells the intruder it exists.
    missing = await api.client.request(
        method, path.format(id=uuid.uuid4()), json=body, headers=intruder
    )
    assert missing.status_code == 404
    assert set(missing.json()) == set(response.json())
    untouched = await api.client.get(f"/v1/servers/{server['id']}", headers=owner)
    assert untouched.json() == server
    listing = await api.client.get("/v1/servers", headers=intruder)
    assert listing.json()["items"] == []


async def test_every_tenant_route_needs_a_valid_key(api: Api) -> None:
    for method, path, body in [*TENANT_ROUTES, ("GET", "/v1/servers", None)]:
        url = path.format(id=uuid.uuid4())
        for headers in (
            {},
            {"Authorization": "Bearer abl_not-a-key"},
            {"Authorization": f"Bearer {api.settings.admin_token.get_secret_value()}"},
        ):
            response = await api.client.request(method, url, json=body, headers=headers)
            assert response.status_code == 401, (method, url, response.text)
            assert response.json()["code"] == "unauthorized"


ENDPOINT_CHANGES = [
    pytest.param("starttls", lambda new: {"port": new.port}, id="port"),
    pytest.param("starttls", lambda new: {"host": "127.0.0.1", "port": new.port}, id="host"),
    pytest.param("tls", lambda new: {"port": new.port, "security": "tls"}, id="security"),
    pytest.param(
        "starttls", lambda new: {"port": new.port, "username": "eve@example.com"}, id="username"
    ),
]


@pytest.mark.parametrize(("security", "change"), ENDPOINT_CHANGES)
async def test_stored_password_never_goes_to_a_new_endpoint(
    api: Api,
    starttls_server: SmtpTestServer,
    certs: Certificates,
    security: str,
    change: Any,
) -> None:
    """A server that takes any login, on a port of the caller's choosing, sees no password
    unless the request itself carries one, and then only that one."""
    tenant = await api.new_tenant()
    login = "carol@example.com"
    stored = starttls_server.recorder.accounts[login]
    server = await add_server(api, tenant, starttls_server, login)
    url = f"/v1/servers/{server['id']}"
    with smtp_server(certs, {}, security=security, accept_any=True) as harvester:
        # aiosmtpd's controller connects once itself to see that the server is up.
        connections_before = harvester.recorder.connections
        body = change(harvester)
        refused = await api.client.patch(url, json=body, headers=tenant)
        assert refused.status_code == 422, refused.text
        problem = refused.json()
        assert problem["code"] == "password_required"
        assert problem["hint"]
        assert [e["field"] for e in problem["errors"]] == ["body.password"]
        # Nothing was dialled, and the server is unchanged.
        assert harvester.recorder.connections == connections_before
        assert harvester.recorder.auth_attempts == []
        assert (await api.client.get(url, headers=tenant)).json() == server

        # With the password in the request, the check runs with that password only.
        accepted = await api.client.patch(
            url, json=body | {"password": "typed-again"}, headers=tenant
        )
        assert accepted.status_code == 200, accepted.text
        assert [password for _, password in harvester.recorder.auth_attempts] == ["typed-again"]
    assert stored not in {password for _, password in harvester.recorder.auth_attempts}


async def test_a_new_username_alone_needs_the_password(
    api: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    server = await add_server(api, tenant, starttls_server)
    attempts_before = len(starttls_server.recorder.auth_attempts)
    response = await api.client.patch(
        f"/v1/servers/{server['id']}", json={"username": "bob@example.com"}, headers=tenant
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "password_required"
    assert len(starttls_server.recorder.auth_attempts) == attempts_before


async def test_endpoint_fields_need_the_password_even_unchanged(
    api: Api, starttls_server: SmtpTestServer
) -> None:
    # The spec can state "host, port, security or username come with the password"; it cannot
    # state "unless equal to the stored value", so neither does the app. A form sent back whole
    # leaves them out (or null) unless the password is typed again.
    tenant = await api.new_tenant()
    server = await add_server(api, tenant, starttls_server)
    url = f"/v1/servers/{server['id']}"
    same = {key: server[key] for key in ("host", "port", "security", "username")}
    refused = await api.client.patch(url, json=same | {"label": "renamed"}, headers=tenant)
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "password_required"
    nulls = dict.fromkeys(same) | {"label": "renamed"}
    response = await api.client.patch(url, json=nulls, headers=tenant)
    assert response.status_code == 200, response.text
    assert response.json()["label"] == "renamed"
    assert response.json()["host"] == server["host"]


async def test_tenant_creation_needs_the_admin_token(api: Api) -> None:
    tenant = await api.new_tenant()
    for headers in ({}, tenant, api.internal()):
        response = await api.client.post("/v1/tenants", json={"name": "x"}, headers=headers)
        assert response.status_code == 401


async def test_internal_credentials_need_the_internal_token(
    api: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    server = await add_server(api, tenant, starttls_server)
    url = f"/internal/v1/servers/{server['id']}/credentials"
    for headers in ({}, tenant, api.admin()):
        assert (await api.client.get(url, headers=headers)).status_code == 401
    response = await api.client.get(url, headers=api.internal())
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    creds = response.json()
    assert creds["password"] == starttls_server.recorder.accounts["alice@example.com"]
    assert (creds["host"], creds["port"], creds["security"]) == (
        "localhost",
        starttls_server.port,
        "starttls",
    )


async def test_canary_password_appears_nowhere_but_the_internal_endpoint(
    api: Api, starttls_server: SmtpTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    canary = f"CANARY-{uuid.uuid4().hex}"
    login = "bob@example.com"
    starttls_server.recorder.accounts[login] = canary
    seen: list[str] = []
    caplog.set_level(logging.DEBUG)
    try:
        tenant = await api.new_tenant()
        server = await add_server(api, tenant, starttls_server, login, canary)
        url = f"/v1/servers/{server['id']}"
        for method, path, body in [
            ("GET", url, None),
            ("GET", "/v1/servers", None),
            ("POST", f"{url}/verify", None),
            ("POST", f"{url}/pause", None),
            ("POST", f"{url}/resume", None),
            ("PATCH", url, {"password": canary}),
            ("PATCH", url, {"password": canary + "-wrong"}),
            (
                "POST",
                "/v1/servers",
                {
                    "host": "localhost",
                    "port": starttls_server.port,
                    "security": "tls",
                    "username": "x@example.com",
                    "password": canary,
                    "from_email": "x@example.com",
                },
            ),
            (
                "POST",
                "/v1/servers",
                {
                    "host": "localhost",
                    "port": starttls_server.port,
                    "security": "starttls",
                    "username": login,
                    "password": canary,
                    "from_email": "bad",
                },
            ),
            (
                "POST",
                "/v1/servers",
                {
                    "host": "localhost",
                    "port": starttls_server.port,
                    "security": "starttls",
                    "username": login,
                    "password": canary + "\r\n",
                    "from_email": login,
                },
            ),
        ]:
            response = await api.client.request(method, path, json=body, headers=tenant)
            seen.append(response.text)
            seen.extend(f"{k}: {v}" for k, v in response.headers.items())
        openapi = await api.client.get("/openapi.json")
        seen.append(openapi.text)
        metrics = await api.client.get("/metrics")
        seen.append(metrics.text)

        engine = create_engine(api.settings.database_url)
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT * FROM smtp_servers"))).all()
        await engine.dispose()
        seen.extend(str(row) for row in rows)
    finally:
        starttls_server.recorder.accounts.pop(login, None)
        starttls_server.recorder.accounts[login] = "bob-app-password"

    # aiosmtpd's own log is the provider's side of the line, not ours.
    seen.extend(r.getMessage() for r in caplog.records if not r.name.startswith("mail.log"))
    encoded = base64.b64encode(canary.encode()).decode()
    leaks = [text for text in seen if canary in text or encoded in text]
    assert leaks == []
    assert rows, "the server row must exist for the column check to mean anything"


async def test_key_rotation_reencrypts_every_row(
    database_url: str, starttls_server: SmtpTestServer
) -> None:
    old_key, new_key = generate_key(), generate_key()
    settings = make_settings(database_url, encryption_keys=old_key)
    async with running(settings) as api:
        tenant = await api.new_tenant()
        created = [
            await add_server(api, tenant, starttls_server, login)
            for login in ("alice@example.com", "bob@example.com", "carol@example.com")
        ]

    rotated = Keyring.from_keys([decode_key(new_key), decode_key(old_key)])
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    report = await rotate_keys(sessions, rotated)
    assert (report.examined, report.reencrypted) == (3, 3)
    assert (await rotate_keys(sessions, rotated)).reencrypted == 0

    only_new = Keyring.from_keys([decode_key(new_key)])
    only_old = Keyring.from_keys([decode_key(old_key)])
    async with sessions() as session:
        for item in created:
            row = await session.get(SmtpServer, uuid.UUID(item["id"]))
            assert row is not None
            aad = associated_data(row.tenant_id, row.id)
            assert (
                only_new.decrypt(row.password_ciphertext, aad)
                == (starttls_server.recorder.accounts[item["username"]])
            )
            with pytest.raises(DecryptionError):
                only_old.decrypt(row.password_ciphertext, aad)
    await engine.dispose()

    # The service keeps working with the new key first and the old one dropped.
    settings = make_settings(
        database_url,
        encryption_keys=new_key,
        internal_token=settings.internal_token.get_secret_value(),
    )
    async with running(settings) as api:
        response = await api.client.get(
            f"/internal/v1/servers/{created[0]['id']}/credentials", headers=api.internal()
        )
        assert response.json()["password"] == starttls_server.recorder.accounts["alice@example.com"]


def test_ciphertext_is_bound_to_tenant_and_server() -> None:
    keyring = Keyring.from_keys([decode_key(generate_key())])
    tenant, server = uuid.uuid4(), uuid.uuid4()
    sealed = keyring.encrypt("secret", associated_data(tenant, server))
    assert keyring.decrypt(sealed, associated_data(tenant, server)) == "secret"
    for aad in (associated_data(uuid.uuid4(), server), associated_data(tenant, uuid.uuid4())):
        with pytest.raises(DecryptionError):
            keyring.decrypt(sealed, aad)
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(DecryptionError):
        keyring.decrypt(tampered, associated_data(tenant, server))


@pytest.mark.parametrize(
    "overrides",
    [
        {"admin_token": ""},
        {"admin_token": "changeme"},
        {"internal_token": "short"},
        {"unsubscribe_key": "changeme"},
        {"unsubscribe_key": "short"},
        {"unsubscribe_old_keys": "u" * 32 + ",short"},
        {"unsubscribe_key": DEVELOPMENT_UNSUBSCRIBE_KEY},  # production (the default env)
        {"encryption_keys": ""},
        {"encryption_keys": "bm90LTMyLWJ5dGVz"},
    ],
)
def test_unsafe_secrets_are_refused(overrides: dict[str, str]) -> None:
    values = {
        "admin_token": "a" * 32,
        "internal_token": "b" * 32,
        "encryption_keys": generate_key(),
        "unsubscribe_key": "u" * 32,
    } | overrides
    with pytest.raises((SettingsError, ValueError)):
        Settings(**values)  # type: ignore[arg-type]


def test_the_unsubscribe_key_has_a_default_outside_production_and_old_keys_in_order() -> None:
    values = {
        "admin_token": "a" * 32,
        "internal_token": "b" * 32,
        "encryption_keys": generate_key(),
    }
    development = Settings(**values, env="development")  # type: ignore[arg-type]
    assert development.unsubscribe_secrets == [DEVELOPMENT_UNSUBSCRIBE_KEY]
    rotated = Settings(
        **values,  # type: ignore[arg-type]
        unsubscribe_key="n" * 32,
        unsubscribe_old_keys="o" * 32 + ", " + "p" * 32,
    )
    assert rotated.unsubscribe_secrets == ["n" * 32, "o" * 32, "p" * 32]
    assert "n" * 32 not in repr(rotated)


def test_settings_read_abl_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = f"{generate_key()},{generate_key()}"
    monkeypatch.setenv("ABL_ADMIN_TOKEN", "x" * 32)
    monkeypatch.setenv("ABL_INTERNAL_TOKEN", "y" * 32)
    monkeypatch.setenv("ABL_UNSUBSCRIBE_KEY", "u" * 32)
    monkeypatch.setenv("ABL_ENCRYPTION_KEYS", keys)
    monkeypatch.setenv("ABL_PORT", "9001")
    monkeypatch.setenv("ABL_ALLOWED_SMTP_PORTS", "587,2525")
    settings = Settings()
    assert settings.port == 9001
    assert len(settings.keys) == 2
    assert settings.allowed_smtp_ports == (587, 2525)
    assert "x" * 32 not in repr(settings)


async def test_framework_errors_are_problem_json(api: Api) -> None:
    not_found = await api.client.get("/v1/nowhere")
    assert not_found.status_code == 404
    assert not_found.headers["content-type"] == "application/problem+json"
    assert not_found.json()["code"] == "not_found"
    wrong_method = await api.client.put("/v1/servers")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["code"] == "method_not_allowed"
    bad_id = await api.client.get("/v1/servers/not-a-uuid", headers=await api.new_tenant())
    assert bad_id.status_code == 422
    assert bad_id.json()["errors"][0]["field"] == "path.server_id"
    bad_json = await api.client.post(
        "/v1/tenants", content=b"{", headers=api.admin() | {"content-type": "application/json"}
    )
    assert bad_json.status_code == 422
    assert bad_json.headers["content-type"] == "application/problem+json"


def test_credentials_never_print_their_password() -> None:
    from shared.messages import SmtpCredentials

    credentials = SmtpCredentials(
        id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        host="smtp.example.com",
        port=587,
        security="starttls",
        username="u",
        password="CANARY-PRINT",
        from_email="u@example.com",
        from_name="",
        status="active",
        daily_cap=500,
    )
    assert "CANARY-PRINT" not in repr(credentials)
    assert "CANARY-PRINT" not in str(credentials)
    assert "CANARY-PRINT" not in f"{credentials!r} {credentials}"
