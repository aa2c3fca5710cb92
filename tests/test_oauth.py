"""Servers connected with OAuth 2.0, against a real authorization server (HTTPS on loopback,
PKCE required, refresh tokens, revocable grants, expirable tokens) and an SMTP server that
accepts XOAUTH2 only and checks each token with it; on SQLite and PostgreSQL.

The flow end to end, the ways a callback is refused, sending through OAuth and password servers
side by side, tokens that expire or are revoked during a run, Microsoft 365 password refusals,
and a canary search for the refresh token everywhere it must not be."""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.registry.keys import rotate_keys
from services.registry.models import OAuthFlow, SmtpServer
from services.registry.oauth.client import JWKS_MIN_REFETCH_SECONDS, expected_issuers
from services.registry.oauth.flows import VERIFIER_PURPOSE
from services.registry.oauth.providers import PROVIDERS
from services.sender.clients import (
    CachedCredentials,
    DependencyUnavailable,
    HttpRegistry,
    token_digest,
)
from shared.broker import InProcessBus
from shared.crypto import Keyring, associated_data, generate_key
from shared.db import create_engine, session_factory
from shared.settings import Settings, decode_key
from tests.conftest import Api, make_settings, running
from tests.support.oauth import (
    FORGERIES,
    AuthorizationServer,
    XOAuth2Recorder,
    authorization_server,
    s256,
)
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server

API_BASE = "http://registry"  # the test client's base URL: the redirect URI lives there
FRONTEND = "https://app.test/servers/connected"
PASSWORD_ACCOUNTS = {"p1@example.com": "p1-password"}


@pytest.fixture
def authority(certs: Certificates, tmp_path: Path) -> Iterator[AuthorizationServer]:
    with authorization_server(certs, tmp_path, f"{API_BASE}/v1/oauth/callback") as server:
        yield server


@pytest.fixture
def oauth_smtp(certs: Certificates, authority: AuthorizationServer) -> Iterator[SmtpTestServer]:
    recorder = XOAuth2Recorder(authority)
    with smtp_server(certs, {}, recorder=recorder, exclude_auth=("LOGIN", "PLAIN")) as server:
        yield server


@pytest.fixture
def password_smtp(certs: Certificates) -> Iterator[SmtpTestServer]:
    with smtp_server(certs, PASSWORD_ACCOUNTS) as server:
        yield server


def oauth_settings(
    database_url: str, authority: AuthorizationServer, smtp: SmtpTestServer, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        **authority.provider_settings("google", smtp.port),
        **authority.provider_settings("microsoft", smtp.port),
        "oauth_redirect_base_url": API_BASE,
        "oauth_frontend_redirect_url": FRONTEND,
    }
    return make_settings(database_url, **(values | overrides))


@pytest.fixture
async def api(
    database_url: str, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> AsyncIterator[Api]:
    async with running(oauth_settings(database_url, authority, oauth_smtp)) as value:
        yield value


def landing(response: httpx.Response) -> dict[str, str]:
    """Where the callback sent the browser: the frontend URL's query."""
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith(FRONTEND + "?"), location
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


async def start(
    api: Api, tenant: dict[str, str], provider: str = "google", **body: Any
) -> dict[str, Any]:
    response = await api.client.post(
        f"/v1/servers/oauth/{provider}/start", json=body, headers=tenant
    )
    assert response.status_code == 201, response.text
    started: dict[str, Any] = response.json()
    return started


async def authorize(authority: AuthorizationServer, authorize_url: str, user: str) -> str:
    """The tenant's browser at the provider: signs in as `user`, consents; the redirect."""
    authority.next_user = user
    async with httpx.AsyncClient() as browser:
        response = await browser.get(authorize_url)
    assert response.status_code == 302, response.text
    location: str = response.headers["location"]
    return location


async def connect(
    api: Api,
    authority: AuthorizationServer,
    tenant: dict[str, str],
    user: str,
    provider: str = "google",
    **body: Any,
) -> dict[str, str]:
    started = await start(api, tenant, provider, **body)
    callback = await authorize(authority, started["authorize_url"], user)
    assert callback.startswith(f"{API_BASE}/v1/oauth/callback?")
    return landing(await api.client.get(callback.removeprefix(API_BASE)))


async def test_connect_google_and_microsoft_end_to_end(
    api: Api, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    started = await start(api, tenant, "google", label="Sales", from_name="Acme Sales")
    query = parse_qs(urlsplit(started["authorize_url"]).query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["state"] == [started["state"]]
    assert query["redirect_uri"] == [f"{API_BASE}/v1/oauth/callback"]
    assert "https://mail.google.com/" in query["scope"][0].split()
    assert query["access_type"] == ["offline"]

    callback = await authorize(authority, started["authorize_url"], "o1@example.com")
    google = landing(await api.client.get(callback.removeprefix(API_BASE)))
    server = (await api.client.get(f"/v1/servers/{google['server_id']}", headers=tenant)).json()
    assert server["status"] == "active"
    assert server["auth"] == "xoauth2"
    assert server["oauth_provider"] == "google"
    assert server["has_password"] is False
    assert (server["username"], server["from_email"]) == ("o1@example.com", "o1@example.com")
    assert (server["label"], server["from_name"]) == ("Sales", "Acme Sales")
    assert (server["host"], server["port"]) == ("localhost", oauth_smtp.port)
    # The check authenticated with XOAUTH2 and the token the provider issued.
    assert oauth_smtp.recorder.logins["o1@example.com"] == 1

    # Microsoft: the address comes from the ID token (this flavour has no usable userinfo).
    microsoft = await connect(api, authority, tenant, "o2@example.com", "microsoft")
    server = (await api.client.get(f"/v1/servers/{microsoft['server_id']}", headers=tenant)).json()
    assert (server["oauth_provider"], server["username"]) == ("microsoft", "o2@example.com")

    status = await api.client.get(f"/v1/servers/oauth/flows/{started['state']}", headers=tenant)
    assert status.json() == {"status": "connected", "server_id": google["server_id"], "error": None}
    # Another tenant cannot read this flow's outcome.
    other = await api.new_tenant("other")
    hidden = await api.client.get(f"/v1/servers/oauth/flows/{started['state']}", headers=other)
    assert hidden.status_code == 404

    # The senders get a short-lived access token, never the refresh token.
    creds = (
        await api.client.get(
            f"/internal/v1/servers/{google['server_id']}/credentials", headers=api.internal()
        )
    ).json()
    assert creds["auth"] == "xoauth2"
    assert creds["password"] == ""
    assert authority.token_valid("o1@example.com", creds["access_token"])
    assert not any(token in str(creds) for token in authority.issued_refresh_tokens)


@pytest.mark.parametrize(
    ("provider", "claims", "issuers"),
    [
        ("google", {}, ["https://accounts.google.com", "accounts.google.com"]),
        (
            "microsoft",
            {"tid": "9188040d-6c67-4c5b-b112-36a304b66dad"},
            ["https://login.microsoftonline.com/9188040d-6c67-4c5b-b112-36a304b66dad/v2.0"],
        ),
        ("microsoft", {}, []),
        ("microsoft", {"tid": "evil.test/x"}, []),
        ("microsoft", {"tid": 42}, []),
    ],
)
def test_the_issuers_an_id_token_may_name(
    provider: str, claims: dict[str, Any], issuers: list[str]
) -> None:
    assert expected_issuers(PROVIDERS[provider], claims) == issuers


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_forged_unsigned_or_misaddressed_id_token_is_refused(
    api: Api, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    """Microsoft's answer carries an ID token; the address is taken from it only once its
    signature checks against the provider's JWKS and its issuer, audience and lifetime hold."""
    tenant = await api.new_tenant()
    before = sample("abl_oauth_connects_total", provider="microsoft", outcome="invalid_id_token")
    for forgery in FORGERIES:
        authority.forge_next = forgery
        started = await start(api, tenant, "microsoft")
        callback = await authorize(authority, started["authorize_url"], "o2@example.com")
        response = await api.client.get(callback.removeprefix(API_BASE))
        assert landing(response) == {"error": "invalid_id_token"}, forgery
        assert authority.forge_next is None, "the token endpoint was not reached"
        status = await api.client.get(f"/v1/servers/oauth/flows/{started['state']}", headers=tenant)
        assert status.json()["error"] == "invalid_id_token"
    after = sample("abl_oauth_connects_total", provider="microsoft", outcome="invalid_id_token")
    assert after - before == len(FORGERIES)
    assert (await api.client.get("/v1/servers", headers=tenant)).json()["items"] == []
    assert oauth_smtp.recorder.logins == {}, "no SMTP check ran on a refused token"
    # A token signed with the published key connects.
    connected = sample("abl_oauth_connects_total", provider="microsoft", outcome="connected")
    done = await connect(api, authority, tenant, "o2@example.com", "microsoft")
    assert "server_id" in done
    assert sample("abl_oauth_connects_total", provider="microsoft", outcome="connected") == (
        connected + 1
    )


async def test_rotated_signing_keys_are_fetched_again_at_most_once_a_minute(
    api: Api, authority: AuthorizationServer
) -> None:
    tenant = await api.new_tenant()
    assert "server_id" in await connect(api, authority, tenant, "o2@example.com", "microsoft")
    assert authority.jwks_fetches == 1
    assert "server_id" in await connect(api, authority, tenant, "o3@example.com", "microsoft")
    assert authority.jwks_fetches == 1  # the keys are kept

    authority.rotate_key()
    # Within a minute of the last fetch an unknown key id is refused without asking the
    # provider again: made-up key ids cannot turn the registry against the provider.
    refused = await connect(api, authority, tenant, "o4@example.com", "microsoft")
    assert refused == {"error": "invalid_id_token"}
    assert authority.jwks_fetches == 1
    client = api.app.state.oauth_client
    for cached in client.jwks.values():
        cached.fetched -= JWKS_MIN_REFETCH_SECONDS  # as a minute passing would
    assert "server_id" in await connect(api, authority, tenant, "o4@example.com", "microsoft")
    assert authority.jwks_fetches == 2


async def test_the_jwks_out_of_reach_lands_with_a_code(
    database_url: str, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    closed = f"https://localhost:{oauth_smtp.port}/keys"  # an SMTP port: no HTTPS there
    settings = oauth_settings(database_url, authority, oauth_smtp, oauth_microsoft_jwks_url=closed)
    async with running(settings) as api:
        tenant = await api.new_tenant()
        done = await connect(api, authority, tenant, "o2@example.com", "microsoft")
        assert done == {"error": "provider_unavailable"}
        assert (await api.client.get("/v1/servers", headers=tenant)).json()["items"] == []


async def test_a_provider_not_configured_answers_404_with_a_hint(
    database_url: str, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    settings = oauth_settings(
        database_url,
        authority,
        oauth_smtp,
        oauth_microsoft_client_id="",
        oauth_microsoft_client_secret="",
    )
    async with running(settings) as api:
        tenant = await api.new_tenant()
        for provider in ("microsoft", "yahoo"):
            response = await api.client.post(
                f"/v1/servers/oauth/{provider}/start", json={}, headers=tenant
            )
            assert response.status_code == 404
            problem = response.json()
            assert problem["code"] == "oauth_provider_not_configured"
            assert "google" in problem["hint"]
            assert "ABL_OAUTH_" in problem["hint"]
            assert "yahoo" not in response.text  # the path's input is not repeated
        assert (
            await api.client.post("/v1/servers/oauth/google/start", json={}, headers=tenant)
        ).status_code == 201
        assert (await api.client.post("/v1/servers/oauth/google/start", json={})).status_code == 401


async def test_a_state_works_once(api: Api, authority: AuthorizationServer) -> None:
    tenant = await api.new_tenant()
    started = await start(api, tenant)
    callback = await authorize(authority, started["authorize_url"], "o1@example.com")
    first = landing(await api.client.get(callback.removeprefix(API_BASE)))
    assert "server_id" in first
    replay = landing(await api.client.get(callback.removeprefix(API_BASE)))
    assert replay == {"error": "state_used"}
    # The same state with a fresh code from the provider is refused too.
    fresh = await authorize(authority, started["authorize_url"], "o1@example.com")
    assert landing(await api.client.get(fresh.removeprefix(API_BASE))) == {"error": "state_used"}
    listing = (await api.client.get("/v1/servers", headers=tenant)).json()["items"]
    assert len(listing) == 1


async def test_forged_and_other_tenants_states_are_refused(
    api: Api, authority: AuthorizationServer
) -> None:
    owner = await api.new_tenant("owner")
    intruder = await api.new_tenant("intruder")
    started = await start(api, owner)
    callback = await authorize(authority, started["authorize_url"], "o1@example.com")
    code = parse_qs(urlsplit(callback).query)["code"][0]
    flow_hex, tenant_hex, expiry, mac = started["state"].split(".")

    # The owner's flow claimed for another tenant (its id in the state): the MAC says no.
    intruder_flow = (await start(api, intruder))["state"]
    intruder_tenant = intruder_flow.split(".")[1]
    for state in (
        f"{flow_hex}.{intruder_tenant}.{expiry}.{mac}",
        f"{flow_hex}.{tenant_hex}.{int(expiry) + 3600}.{mac}",
        f"{uuid.uuid4().hex}.{tenant_hex}.{expiry}.{mac}",
        "not-a-state",
        "",
    ):
        response = await api.client.get("/v1/oauth/callback", params={"code": code, "state": state})
        assert landing(response) == {"error": "bad_state"}, state
    assert (await api.client.get("/v1/servers", headers=intruder)).json()["items"] == []
    # None of that used the owner's flow: it still completes, for the owner.
    done = landing(await api.client.get(callback.removeprefix(API_BASE)))
    server = await api.client.get(f"/v1/servers/{done['server_id']}", headers=owner)
    assert server.status_code == 200
    assert (
        await api.client.get(f"/v1/servers/{done['server_id']}", headers=intruder)
    ).status_code == 404


async def test_reconnecting_another_tenants_server_is_404(
    api: Api, authority: AuthorizationServer
) -> None:
    owner = await api.new_tenant("owner")
    intruder = await api.new_tenant("intruder")
    done = await connect(api, authority, owner, "o1@example.com")
    response = await api.client.post(
        "/v1/servers/oauth/google/start", json={"server_id": done["server_id"]}, headers=intruder
    )
    assert response.status_code == 404
    assert response.json()["code"] == "server_not_found"


async def test_pkce_is_required_and_bound_to_the_flow(
    api: Api, authority: AuthorizationServer
) -> None:
    tenant = await api.new_tenant()
    started = await start(api, tenant)
    callback = await authorize(authority, started["authorize_url"], "o1@example.com")
    code = parse_qs(urlsplit(callback).query)["code"][0]
    token_url = f"{authority.base_url}/google/token"
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": f"{API_BASE}/v1/oauth/callback",
        "client_id": "abl-test-client",
        "client_secret": "abl-test-client-secret",
    }
    async with httpx.AsyncClient() as client:
        # Someone who caught the code but not the verifier cannot redeem it.
        missing = await client.post(token_url, data=form)
        wrong = await client.post(token_url, data=form | {"code_verifier": "x" * 64})
    assert missing.json() == {"error": "invalid_grant"}
    assert wrong.json() == {"error": "invalid_grant"}

    # The registry's flow row holds the verifier that matches the challenge it sent.
    engine = create_engine(api.settings.database_url)
    async with session_factory(engine)() as session:
        flow = await session.get(OAuthFlow, uuid.UUID(hex=started["state"].split(".")[0]))
        assert flow is not None
        keyring = Keyring.from_keys(api.settings.keys)
        verifier = keyring.decrypt(
            flow.verifier_ciphertext, associated_data(flow.tenant_id, flow.id, VERIFIER_PURPOSE)
        )
    await engine.dispose()
    challenge = parse_qs(urlsplit(started["authorize_url"]).query)["code_challenge"][0]
    assert s256(verifier) == challenge
    assert verifier not in started["authorize_url"]

    # A flow whose stored verifier does not match (as if it had been lost): refused.
    other = await start(api, tenant)
    other_callback = await authorize(authority, other["authorize_url"], "o1@example.com")
    engine = create_engine(api.settings.database_url)
    async with session_factory(engine)() as session, session.begin():
        row = await session.get(OAuthFlow, uuid.UUID(hex=other["state"].split(".")[0]))
        assert row is not None
        row.verifier_ciphertext = keyring.encrypt(
            "a-verifier-that-was-never-sent-" + "y" * 20,
            associated_data(row.tenant_id, row.id, VERIFIER_PURPOSE),
        )
        session.add(row)
    await engine.dispose()
    refused = landing(await api.client.get(other_callback.removeprefix(API_BASE)))
    assert refused == {"error": "invalid_grant"}
    # The good flow still completes.
    assert "server_id" in landing(await api.client.get(callback.removeprefix(API_BASE)))


async def test_a_wrong_redirect_uri_gets_no_code(
    database_url: str, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    # The platform announces a redirect URI the provider has not registered for the client.
    settings = oauth_settings(
        database_url, authority, oauth_smtp, oauth_redirect_base_url="https://evil.test"
    )
    async with running(settings) as api:
        tenant = await api.new_tenant()
        started = await start(api, tenant)
        async with httpx.AsyncClient() as browser:
            response = await browser.get(started["authorize_url"])
        assert response.status_code == 400
        assert "location" not in response.headers
        assert authority.codes == {}


async def test_declined_consent_expired_state_and_missing_code_land_with_a_code(
    database_url: str, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    settings = oauth_settings(database_url, authority, oauth_smtp, oauth_state_ttl_seconds=1)
    async with running(settings) as api:
        tenant = await api.new_tenant()
        declined = await start(api, tenant)
        authority.decline_next = True
        callback = await authorize(authority, declined["authorize_url"], "o1@example.com")
        assert landing(await api.client.get(callback.removeprefix(API_BASE))) == {
            "error": "access_denied"
        }
        status = await api.client.get(
            f"/v1/servers/oauth/flows/{declined['state']}", headers=tenant
        )
        assert status.json()["error"] == "access_denied"

        no_code = await start(api, tenant)
        response = await api.client.get("/v1/oauth/callback", params={"state": no_code["state"]})
        assert landing(response) == {"error": "missing_code"}

        late = await start(api, tenant)
        callback = await authorize(authority, late["authorize_url"], "o1@example.com")
        await asyncio.sleep(1.2)
        assert landing(await api.client.get(callback.removeprefix(API_BASE))) == {
            "error": "state_expired"
        }
        assert (await api.client.get("/v1/servers", headers=tenant)).json()["items"] == []


async def test_without_a_frontend_url_the_callback_lands_on_a_result_page(
    database_url: str, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    settings = oauth_settings(database_url, authority, oauth_smtp, oauth_frontend_redirect_url="")
    async with running(settings) as api:
        tenant = await api.new_tenant()
        started = await start(api, tenant)
        callback = await authorize(authority, started["authorize_url"], "o1@example.com")
        response = await api.client.get(callback.removeprefix(API_BASE), follow_redirects=True)
        assert response.status_code == 200
        assert response.text.startswith("Connected: server ")
        replay = await api.client.get(callback.removeprefix(API_BASE), follow_redirects=True)
        assert "state_used" in replay.text


async def test_the_provider_down_lands_with_a_code_not_a_stack_trace(
    database_url: str, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    # An SMTP port, not an HTTPS one: the TLS handshake fails, as with a provider that is down.
    closed = f"https://localhost:{oauth_smtp.port}/token"
    settings = oauth_settings(database_url, authority, oauth_smtp, oauth_google_token_url=closed)
    async with running(settings) as api:
        tenant = await api.new_tenant()
        started = await start(api, tenant)
        callback = await authorize(authority, started["authorize_url"], "o1@example.com")
        response = await api.client.get(callback.removeprefix(API_BASE))
        assert landing(response) == {"error": "provider_unavailable"}
        assert "Traceback" not in response.text


async def test_reconnect_keeps_the_server_and_refuses_another_mailbox(
    api: Api, authority: AuthorizationServer
) -> None:
    tenant = await api.new_tenant()
    first = await connect(api, authority, tenant, "o1@example.com")
    server_id = first["server_id"]
    mismatch = await connect(api, authority, tenant, "o9@example.com", server_id=server_id)
    assert mismatch == {"error": "account_mismatch"}
    again = await connect(api, authority, tenant, "o1@example.com", server_id=server_id)
    assert again == {"server_id": server_id}
    # Connecting the same mailbox without server_id updates that server too: no duplicate.
    same = await connect(api, authority, tenant, "o1@example.com")
    assert same == {"server_id": server_id}
    assert len((await api.client.get("/v1/servers", headers=tenant)).json()["items"]) == 1


async def test_microsoft_365_refusing_passwords_points_to_oauth_on_add(
    api: Api, password_smtp: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    password_smtp.recorder.basic_auth_off.add("p1@example.com")
    response = await api.client.post(
        "/v1/servers",
        json={
            "host": "localhost",
            "port": password_smtp.port,
            "security": "starttls",
            "username": "p1@example.com",
            "password": PASSWORD_ACCOUNTS["p1@example.com"],
            "from_email": "p1@example.com",
        },
        headers=tenant,
    )
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "auth_failed"
    assert "5.7.30" in problem["detail"]
    assert "/v1/servers/oauth/microsoft/start" in problem["hint"]


# Sending ------------------------------------------------------------------------------------


def send_settings(
    database_url: str, authority: AuthorizationServer, smtp: SmtpTestServer
) -> Settings:
    return oauth_settings(
        database_url,
        authority,
        smtp,
        tick_seconds=0.05,
        retry_base_seconds=0.0,
        retry_cap_seconds=0.0,
        credentials_ttl_seconds=0.0,
        # Every email opens its own SMTP session, so each one authenticates with the current
        # token (a pooled session would carry on with the old one).
        sender_idle_seconds=0.001,
    )


@pytest.fixture
async def live(
    database_url: str, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> AsyncIterator[Api]:
    settings = send_settings(database_url, authority, oauth_smtp)
    async with running(settings, combined=True, loops=True) as api:
        yield api


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def add_password_server(api: Api, tenant: dict[str, str], smtp: SmtpTestServer) -> str:
    response = await api.client.post(
        "/v1/servers",
        json={
            "host": "localhost",
            "port": smtp.port,
            "security": "starttls",
            "username": "p1@example.com",
            "password": PASSWORD_ACCOUNTS["p1@example.com"],
            "from_email": "p1@example.com",
        },
        headers=tenant,
    )
    assert response.status_code == 201, response.text
    server_id: str = response.json()["id"]
    return server_id


async def queue(api: Api, tenant: dict[str, str], count: int, prefix: str) -> None:
    batch = {
        "messages": [
            {"to": f"ok+{prefix}{i}@example.org", "subject": f"s{i}", "text": "t"}
            for i in range(count)
        ]
    }
    response = await api.client.post("/v1/messages", json=batch, headers=tenant)
    assert response.status_code == 202, response.text


async def statuses(api: Api, tenant: dict[str, str]) -> dict[str, int]:
    page = (await api.client.get("/v1/messages?limit=500", headers=tenant)).json()
    counts: dict[str, int] = {}
    for item in page["items"]:
        counts[item["status"]] = counts.get(item["status"], 0) + 1
    return counts


async def three_servers(
    api: Api,
    authority: AuthorizationServer,
    password_smtp: SmtpTestServer,
) -> tuple[dict[str, str], dict[str, str]]:
    tenant = await api.new_tenant()
    ids = {
        "o1@example.com": (await connect(api, authority, tenant, "o1@example.com"))["server_id"],
        "o2@example.com": (await connect(api, authority, tenant, "o2@example.com", "microsoft"))[
            "server_id"
        ],
        "p1@example.com": await add_password_server(api, tenant, password_smtp),
    }
    return tenant, ids


def accepted(*servers: SmtpTestServer) -> dict[str, int]:
    found: dict[str, int] = {}
    for server in servers:
        found.update(server.recorder.accepted)
    return found


async def test_30_emails_through_two_oauth_servers_and_one_password_server(
    live: Api,
    authority: AuthorizationServer,
    oauth_smtp: SmtpTestServer,
    password_smtp: SmtpTestServer,
) -> None:
    tenant, _ = await three_servers(live, authority, password_smtp)
    await queue(live, tenant, 30, "a")
    await eventually(lambda: _all_sent(live, tenant, 30))
    assert accepted(oauth_smtp, password_smtp) == {
        "o1@example.com": 10,
        "o2@example.com": 10,
        "p1@example.com": 10,
    }
    assert sum(authority.refreshes.values()) == 0  # the tokens from the connection sufficed


async def _all_sent(api: Api, tenant: dict[str, str], count: int) -> bool:
    return (await statuses(api, tenant)).get("sent", 0) == count


async def test_tokens_expiring_mid_run_are_refreshed_once_and_nothing_is_lost(
    live: Api,
    authority: AuthorizationServer,
    oauth_smtp: SmtpTestServer,
    password_smtp: SmtpTestServer,
) -> None:
    tenant, _ = await three_servers(live, authority, password_smtp)
    await queue(live, tenant, 15, "a")
    await eventually(lambda: _all_sent(live, tenant, 15))
    # The provider ends every access token early; the registry still thinks they are good.
    authority.expire_tokens()
    await queue(live, tenant, 15, "b")
    await eventually(lambda: _all_sent(live, tenant, 30))
    counts = await statuses(live, tenant)
    assert counts == {"sent": 30}
    assert sum(accepted(oauth_smtp, password_smtp).values()) == 30
    recorder = oauth_smtp.recorder
    assert isinstance(recorder, XOAuth2Recorder)
    assert recorder.refused_tokens >= 2  # each OAuth server saw its old token fail
    # One refresh per server, however many of its emails found the token refused.
    assert dict(authority.refreshes) == {"o1@example.com": 1, "o2@example.com": 1}


async def test_a_revoked_grant_marks_the_server_and_the_others_send(
    live: Api,
    authority: AuthorizationServer,
    oauth_smtp: SmtpTestServer,
    password_smtp: SmtpTestServer,
) -> None:
    tenant, ids = await three_servers(live, authority, password_smtp)
    authority.revoke("o1@example.com")
    authority.expire_tokens("o1@example.com")
    await queue(live, tenant, 20, "a")
    await eventually(lambda: _all_sent(live, tenant, 20))
    sent = accepted(oauth_smtp, password_smtp)
    assert "o1@example.com" not in sent
    assert sent["o2@example.com"] + sent["p1@example.com"] == 20
    server = (await live.client.get(f"/v1/servers/{ids['o1@example.com']}", headers=tenant)).json()
    assert server["status"] == "auth_failed"
    assert server["last_check"]["code"] == "auth_failed"
    assert "invalid_grant" in server["last_check"]["reply"]
    assert "reconnect this account" in server["last_check"]["hint"]
    assert "/v1/servers/oauth/google/start" in server["last_check"]["hint"]
    assert (await statuses(live, tenant)) == {"sent": 20}

    # Reconnecting the account brings the same server back.
    again = await connect(
        live, authority, tenant, "o1@example.com", server_id=ids["o1@example.com"]
    )
    assert again == {"server_id": ids["o1@example.com"]}
    server = (await live.client.get(f"/v1/servers/{ids['o1@example.com']}", headers=tenant)).json()
    assert server["status"] == "active"


async def test_a_microsoft_365_password_server_refused_mid_run_is_told_to_use_oauth(
    live: Api,
    authority: AuthorizationServer,
    oauth_smtp: SmtpTestServer,
    password_smtp: SmtpTestServer,
) -> None:
    tenant, ids = await three_servers(live, authority, password_smtp)
    password_smtp.recorder.basic_auth_off.add("p1@example.com")
    await queue(live, tenant, 12, "a")
    await eventually(lambda: _all_sent(live, tenant, 12))
    assert "p1@example.com" not in accepted(password_smtp)
    server = (await live.client.get(f"/v1/servers/{ids['p1@example.com']}", headers=tenant)).json()
    assert server["status"] == "auth_failed"
    assert "5.7.30" in server["last_check"]["reply"]
    assert "/v1/servers/oauth/microsoft/start" in server["last_check"]["hint"]


async def test_the_refresh_token_appears_in_no_response_log_metric_or_message(
    live: Api,
    authority: AuthorizationServer,
    oauth_smtp: SmtpTestServer,
    password_smtp: SmtpTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bus = live.app.state.bus
    assert isinstance(bus, InProcessBus)
    published: list[bytes] = []
    original = bus.publish

    async def recording(queue_name: str, body: bytes, **kwargs: Any) -> None:
        published.append(body)
        await original(queue_name, body, **kwargs)

    bus.publish = recording  # type: ignore[method-assign,assignment]
    seen: list[str] = []

    tenant, ids = await three_servers(live, authority, password_smtp)
    await queue(live, tenant, 6, "a")
    await eventually(lambda: _all_sent(live, tenant, 6))
    authority.expire_tokens()  # a refresh (Microsoft rotates its refresh token)
    await queue(live, tenant, 6, "b")
    await eventually(lambda: _all_sent(live, tenant, 12))
    authority.revoke("o1@example.com")
    authority.expire_tokens("o1@example.com")
    await queue(live, tenant, 6, "c")
    await eventually(lambda: _all_sent(live, tenant, 18))

    for server_id in ids.values():
        for path in (f"/v1/servers/{server_id}", f"/v1/servers/{server_id}/warmup"):
            response = await live.client.get(path, headers=tenant)
            seen.append(response.text)
            seen.extend(f"{k}: {v}" for k, v in response.headers.items())
        internal = await live.client.get(
            f"/internal/v1/servers/{server_id}/credentials", headers=live.internal()
        )
        seen.append(internal.text)
    for path in ("/v1/servers", "/v1/messages?limit=500"):
        seen.append((await live.client.get(path, headers=tenant)).text)
    seen.append((await live.client.get("/metrics")).text)
    seen.append((await live.client.get("/openapi.json")).text)
    seen.extend(body.decode(errors="replace") for body in published)
    seen.extend(r.getMessage() for r in caplog.records)
    engine = create_engine(live.settings.database_url)
    async with engine.connect() as connection:
        for table in ("smtp_servers", "oauth_flows", "emails"):
            rows = (await connection.execute(text(f"SELECT * FROM {table}"))).all()  # noqa: S608
            seen.extend(str(row) for row in rows)
    await engine.dispose()

    canaries = authority.issued_refresh_tokens
    assert len(canaries) >= 3, "connections and a rotation issued refresh tokens"
    assert published, "the broker carried jobs and results"
    leaks = [
        item
        for item in seen
        for canary in canaries
        if canary in item or base64.b64encode(canary.encode()).decode() in item
    ]
    assert leaks == []


async def test_key_rotation_reencrypts_oauth_tokens(
    live: Api, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    tenant = await live.new_tenant()
    done = await connect(live, authority, tenant, "o1@example.com")
    new_key = decode_key(generate_key())
    rotated = Keyring.from_keys([new_key, *live.settings.keys])
    engine = create_engine(live.settings.database_url)
    sessions = session_factory(engine)
    report = await rotate_keys(sessions, rotated)
    assert report.reencrypted == 1
    only_new = Keyring.from_keys([new_key])
    async with sessions() as session:
        row = await session.get(SmtpServer, uuid.UUID(done["server_id"]))
        assert row is not None
        assert row.refresh_token_ciphertext is not None
        aad = associated_data(row.tenant_id, row.id, "oauth-refresh-token")
        assert only_new.decrypt(row.refresh_token_ciphertext, aad) in (
            authority.issued_refresh_tokens
        )
    await engine.dispose()


async def test_the_refresh_route_refreshes_once_for_many_senders(
    api: Api, authority: AuthorizationServer
) -> None:
    """The stack's path: senders' HTTP client against the registry's internal routes."""
    tenant = await api.new_tenant()
    done = await connect(api, authority, tenant, "o2@example.com", "microsoft")
    server_id = uuid.UUID(done["server_id"])
    registry = HttpRegistry(api.client, api.settings.internal_token.get_secret_value())
    refreshed = {
        outcome: sample("abl_oauth_token_refreshes_total", provider="microsoft", outcome=outcome)
        for outcome in ("ok", "grant_gone")
    }
    # Ten senders, each with a cache of its own, all holding the token the server refused.
    senders = [
        CachedCredentials(registry.fetch, registry.report, 60.0, registry.refresh)
        for _ in range(10)
    ]
    old = await senders[0].credentials(server_id)
    assert old is not None
    assert old.access_token is not None
    authority.expire_tokens("o2@example.com")
    fresh = await asyncio.gather(*(sender.refreshed(server_id, old) for sender in senders))
    tokens = {item.access_token for item in fresh if item is not None}
    assert len(tokens) == 1
    assert old.access_token not in tokens
    assert authority.token_valid("o2@example.com", tokens.pop() or "")
    assert authority.refreshes["o2@example.com"] == 1
    # A late report of the old token changes nothing more.
    late = await registry.refresh(server_id, token_digest(old.access_token))
    assert late is not None
    assert late.access_token != old.access_token
    assert authority.refreshes["o2@example.com"] == 1

    # The grant revoked: the refresh is refused, the server is auth_failed, no token is given.
    authority.revoke("o2@example.com")
    current = await registry.fetch(server_id)
    assert current is not None
    assert current.access_token is not None
    gone = await registry.refresh(server_id, token_digest(current.access_token))
    assert gone is not None
    assert (gone.status, gone.access_token) == ("auth_failed", None)
    server = (await api.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()
    assert server["status"] == "auth_failed"
    # One successful refresh and one refused, as the provider saw them.
    assert {
        outcome: sample("abl_oauth_token_refreshes_total", provider="microsoft", outcome=outcome)
        - before
        for outcome, before in refreshed.items()
    } == {"ok": 1, "grant_gone": 1}
    exposition = (await api.client.get("/metrics")).text
    assert 'abl_oauth_token_refreshes_total{outcome="ok",provider="microsoft"}' in exposition


async def test_the_provider_unreachable_on_refresh_is_a_503_the_sender_waits_on(
    database_url: str, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    async with running(oauth_settings(database_url, authority, oauth_smtp)) as api:
        tenant = await api.new_tenant()
        done = await connect(api, authority, tenant, "o1@example.com")
        server_id = uuid.UUID(done["server_id"])
        registry = HttpRegistry(api.client, api.settings.internal_token.get_secret_value())
        current = await registry.fetch(server_id)
        assert current is not None
        assert current.access_token is not None
        # The provider's token endpoint goes away.
        providers = api.app.state.token_keeper.providers
        providers["google"] = replace(
            providers["google"], token_url=f"https://localhost:{oauth_smtp.port}/token"
        )
        unavailable = sample(
            "abl_oauth_token_refreshes_total", provider="google", outcome="unavailable"
        )
        with pytest.raises(DependencyUnavailable):
            await registry.refresh(server_id, token_digest(current.access_token))
        assert (
            sample("abl_oauth_token_refreshes_total", provider="google", outcome="unavailable")
            == unavailable + 1
        )
        server = (await api.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()
        assert server["status"] == "active"  # the server is not at fault


def test_the_callbacks_code_and_state_are_redacted_in_the_access_log() -> None:
    from shared.logs import redact_path

    logged = redact_path("/v1/oauth/callback?code=CODE-CANARY&state=STATE-CANARY&error=x")
    assert "CODE-CANARY" not in logged
    assert "STATE-CANARY" not in logged
    assert "error=x" in logged


async def test_verify_and_patch_of_an_oauth_server(
    api: Api, authority: AuthorizationServer, oauth_smtp: SmtpTestServer
) -> None:
    tenant = await api.new_tenant()
    server_id = (await connect(api, authority, tenant, "o1@example.com"))["server_id"]
    # Verify checks again with XOAUTH2, refreshing a token the provider ended early.
    authority.expire_tokens("o1@example.com")
    verified = await api.client.post(f"/v1/servers/{server_id}/verify", headers=tenant)
    assert verified.status_code == 200, verified.text
    assert verified.json()["status"] == "active"
    assert oauth_smtp.recorder.logins["o1@example.com"] == 2  # the connect and the verify
    assert authority.refreshes["o1@example.com"] == 1

    # Label and sender name change as for any server; the connection fields do not.
    renamed = await api.client.patch(
        f"/v1/servers/{server_id}", json={"label": "Renamed"}, headers=tenant
    )
    assert renamed.json()["label"] == "Renamed"
    for body in ({"host": "smtp.example.net", "password": "x"}, {"password": "x"}):
        refused = await api.client.patch(f"/v1/servers/{server_id}", json=body, headers=tenant)
        assert refused.status_code == 422
        assert refused.json()["code"] == "oauth_server"
        assert "/v1/servers/oauth/google/start" in refused.json()["hint"]

    # Revoked: verify says auth_failed and how to reconnect.
    authority.revoke("o1@example.com")
    authority.expire_tokens("o1@example.com")
    failed = (await api.client.post(f"/v1/servers/{server_id}/verify", headers=tenant)).json()
    assert failed["status"] == "auth_failed"
    assert "reconnect this account" in failed["last_check"]["hint"]
