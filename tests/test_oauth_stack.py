"""OAuth servers in the stack as production runs it: registry, scheduler, two senders and the
gateway as separate processes on PostgreSQL and RabbitMQ, against the local HTTPS
authorization server and an SMTP server that accepts XOAUTH2 only (tests/support/oauth.py).

One run goes through the whole life of two OAuth servers beside a password server: connected
through the gateway, 30 emails 10 each, access tokens ended by the provider while emails are in
flight (one refresh per server, counted at the provider), a grant revoked (that server
`auth_failed`, its emails sent by the others), and the refresh token searched for in every
process's log, every message the broker carried, every response and the metrics. Another
test runs two registry replicas on one database and asks both, many times at once, for the
credentials of one server whose token has run out: the provider sees one refresh."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.sender.clients import token_digest
from shared.broker import DEAD_LETTER_EXCHANGE, EXCHANGE
from shared.settings import Settings
from tests.conftest import AMQP_URL, make_settings, require_service, truncate_postgres
from tests.support.oauth import AuthorizationServer, XOAuth2Recorder, authorization_server
from tests.support.processes import Service, delete_queues, new_tenant, service_env, start
from tests.support.smtp import Certificates, SmtpTestServer, free_port, smtp_server
from tests.test_stack import running_stack, statuses, wait_until, warm_up

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

FRONTEND = "https://app.test/servers/connected"
PASSWORD_ACCOUNTS = {"p1@example.com": "p1-password"}
DATA_DELAY = 0.2  # seconds the SMTP servers take per message: the run lasts long enough to
# end the tokens while emails are in flight


def oauth_env(authority: AuthorizationServer, smtp_port: int, api_base: str) -> dict[str, str]:
    """The ABL_OAUTH_* settings that point a registry at the local authorization server."""
    values: dict[str, Any] = {
        **authority.provider_settings("google", smtp_port),
        **authority.provider_settings("microsoft", smtp_port),
        "oauth_redirect_base_url": api_base,
        "oauth_frontend_redirect_url": FRONTEND,
    }
    return {f"ABL_{name.upper()}": str(value) for name, value in values.items()}


def connect(
    api: httpx.Client,
    authority: AuthorizationServer,
    tenant: dict[str, str],
    user: str,
    provider: str,
    **body: Any,
) -> dict[str, str]:
    """The frontend starts, the tenant's browser consents at the provider and follows the
    redirect to the callback; where the callback sends it (the frontend URL's query)."""
    started = api.post(f"/v1/servers/oauth/{provider}/start", json=body, headers=tenant)
    assert started.status_code == 201, started.text
    authority.next_user = user
    at_provider = httpx.get(started.json()["authorize_url"], timeout=30)
    assert at_provider.status_code == 302, at_provider.text
    callback = at_provider.headers["location"]
    assert callback.startswith(f"{str(api.base_url).rstrip('/')}/v1/oauth/callback?"), callback
    landed = httpx.get(callback, timeout=60)
    assert landed.status_code == 303, landed.text
    location = landed.headers["location"]
    assert location.startswith(FRONTEND + "?"), location
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


class BrokerTap:
    """A queue of the test's own bound beside the services' queues: a copy of every message
    published to the send-jobs, results and events queues (and their dead letters) and every
    cancel broadcast."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = f"{settings.queue_prefix}.test-tap"

    async def bind(self) -> None:
        import aio_pika

        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            tap = await channel.declare_queue(self.name, durable=False)
            direct = await channel.declare_exchange(
                EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            dead = await channel.declare_exchange(
                DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            queues = (
                self.settings.send_jobs_queue,
                self.settings.results_queue,
                self.settings.events_queue,
            )
            for queue in queues:
                await tap.bind(direct, routing_key=queue)
                await tap.bind(dead, routing_key=queue)
            cancels = await channel.declare_exchange(
                self.settings.cancels_topic, aio_pika.ExchangeType.FANOUT, durable=True
            )
            await tap.bind(cancels)

    async def drain(self) -> list[tuple[str, bytes]]:
        """Every message copied so far: (routing key, body); the tap is deleted."""
        import aio_pika

        found: list[tuple[str, bytes]] = []
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            tap = await channel.declare_queue(self.name, durable=False)
            while (message := await tap.get(fail=False, no_ack=True)) is not None:
                found.append((message.routing_key or "", message.body))
            await channel.queue_delete(self.name)
        return found


@dataclass
class OAuthStack:
    settings: Settings
    authority: AuthorizationServer
    oauth_smtp: SmtpTestServer
    password_smtp: SmtpTestServer
    registry: Service
    gateway: Service
    services: list[Service]
    tap: BrokerTap

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.gateway.url, timeout=60)


@pytest.fixture
def oauth_stack(
    migrated_postgres: str, certs: Certificates, tmp_path: Path
) -> Iterator[OAuthStack]:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    # The redirect URI names the gateway, so its port is chosen before anything starts.
    gateway_port = free_port()
    api_base = f"http://127.0.0.1:{gateway_port}"
    with (
        authorization_server(certs, tmp_path, f"{api_base}/v1/oauth/callback") as authority,
        smtp_server(
            certs,
            {},
            recorder=XOAuth2Recorder(authority, data_delay=DATA_DELAY),
            exclude_auth=("LOGIN", "PLAIN"),
        ) as oauth_smtp,
        smtp_server(certs, PASSWORD_ACCOUNTS, data_delay=DATA_DELAY) as password_smtp,
        running_stack(
            migrated_postgres,
            AMQP_URL,
            certs,
            tmp_path,
            # Every process logs at DEBUG: the canary search reads all of it.
            ABL_LOG_LEVEL="DEBUG",
            ABL_RETRY_BASE_SECONDS="0",
            ABL_RETRY_CAP_SECONDS="0",
            ABL_SENDER_PREFETCH="1",
            # Each email authenticates on a session of its own, so each one shows the SMTP
            # server the token its sender holds (a pooled session would carry on with the old).
            ABL_SENDER_IDLE_SECONDS="0.001",
            **oauth_env(authority, oauth_smtp.port, api_base),
        ) as stack,
    ):
        tap = BrokerTap(stack.settings)
        asyncio.run(tap.bind())
        stack.sender("sender-1")
        stack.sender("sender-2")
        gateway = start("gateway", "gateway", stack.env, stack.logs, port=gateway_port)
        try:
            yield OAuthStack(
                stack.settings,
                authority,
                oauth_smtp,
                password_smtp,
                stack.registry,
                gateway,
                [stack.registry, stack.scheduler, *stack.senders, gateway],
                tap,
            )
        finally:
            gateway.stop()


def queue(api: httpx.Client, tenant: dict[str, str], count: int, prefix: str) -> None:
    batch = {
        "messages": [
            {"to": f"ok+{prefix}{i}@example.org", "subject": f"s{i}", "text": "t"}
            for i in range(count)
        ]
    }
    response = api.post("/v1/messages", json=batch, headers=tenant)
    assert response.status_code == 202, response.text


def accepted(stack: OAuthStack) -> Counter[str]:
    return Counter(stack.oauth_smtp.recorder.accepted) + Counter(
        stack.password_smtp.recorder.accepted
    )


def metric(exposition: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_oauth_servers_through_the_stack(oauth_stack: OAuthStack) -> None:
    stack, authority = oauth_stack, oauth_stack.authority
    api = stack.api()
    tenant = new_tenant(api, stack.settings.admin_token.get_secret_value())

    # Connected through the gateway: start, the provider's consent, the callback.
    ids = {
        "o1@example.com": connect(api, authority, tenant, "o1@example.com", "google"),
        "o2@example.com": connect(api, authority, tenant, "o2@example.com", "microsoft"),
    }
    server_ids = {user: landed["server_id"] for user, landed in ids.items()}
    added = api.post(
        "/v1/servers",
        headers=tenant,
        json={
            "host": "localhost",
            "port": stack.password_smtp.port,
            "security": "starttls",
            "username": "p1@example.com",
            "password": PASSWORD_ACCOUNTS["p1@example.com"],
            "from_email": "p1@example.com",
        },
    )
    assert added.status_code == 201, added.text
    server_ids["p1@example.com"] = added.json()["id"]
    for user in ("o1@example.com", "o2@example.com"):
        server = api.get(f"/v1/servers/{server_ids[user]}", headers=tenant).json()
        assert (server["status"], server["auth"], server["username"]) == (
            "active",
            "xoauth2",
            user,
        )
    # Warm (test set-up), so that the three phases' 70 emails are not capped by warmup.
    asyncio.run(warm_up(stack.settings.database_url, list(server_ids.values())))

    # 30 emails, 10 through each server, counted at the SMTP servers.
    queue(api, tenant, 30, "a")
    wait_until(lambda: statuses(api, tenant) == {"sent": 30}, seconds=120)
    assert accepted(stack) == {"o1@example.com": 10, "o2@example.com": 10, "p1@example.com": 10}
    assert sum(authority.refreshes.values()) == 0  # the connection's tokens sufficed

    # The provider ends every access token while the next 30 are on their way.
    queue(api, tenant, 30, "b")
    wait_until(lambda: sum(accepted(stack).values()) >= 36, seconds=120)
    authority.expire_tokens()
    at_expiry = accepted(stack)
    wait_until(lambda: statuses(api, tenant) == {"sent": 60}, seconds=120)
    after = accepted(stack)
    assert after == {"o1@example.com": 20, "o2@example.com": 20, "p1@example.com": 20}
    for user in ("o1@example.com", "o2@example.com"):
        assert at_expiry[user] < 20, f"{user}'s emails were all sent before the expiry"
    recorder = stack.oauth_smtp.recorder
    assert isinstance(recorder, XOAuth2Recorder)
    assert recorder.refused_tokens >= 2  # each OAuth server refused its old token
    # Once per server, whichever sender saw the refusal first.
    assert dict(authority.refreshes) == {"o1@example.com": 1, "o2@example.com": 1}

    # A grant revoked: the refresh is refused, the server auth_failed, the others send.
    authority.revoke("o1@example.com")
    authority.expire_tokens("o1@example.com")
    queue(api, tenant, 10, "c")
    wait_until(lambda: statuses(api, tenant) == {"sent": 70}, seconds=120)
    final = accepted(stack)
    assert final["o1@example.com"] == 20, "a revoked server sent"
    assert final["o2@example.com"] + final["p1@example.com"] == 50
    server = api.get(f"/v1/servers/{server_ids['o1@example.com']}", headers=tenant).json()
    assert server["status"] == "auth_failed"
    assert "invalid_grant" in server["last_check"]["reply"]
    assert "reconnect this account" in server["last_check"]["hint"]
    assert "/v1/servers/oauth/google/start" in server["last_check"]["hint"]
    assert sum(accepted(stack).values()) == 70  # nothing lost, nothing sent twice

    # What the registry counted.
    exposition = httpx.get(f"{stack.registry.url}/metrics", timeout=30).text
    name = "abl_oauth_token_refreshes_total"
    assert metric(exposition, name, provider="google", outcome="ok") == 1
    assert metric(exposition, name, provider="microsoft", outcome="ok") == 1
    assert metric(exposition, name, provider="google", outcome="grant_gone") == 1
    name = "abl_oauth_connects_total"
    assert metric(exposition, name, provider="google", outcome="connected") == 1
    assert metric(exposition, name, provider="microsoft", outcome="connected") == 1

    # The canary search: no refresh token in any log, message, response or metric.
    seen: list[tuple[str, str]] = []
    for service in stack.services:
        seen.append((service.log.name, service.log.read_text(errors="replace")))
        seen.append((f"{service.name} /metrics", httpx.get(f"{service.url}/metrics").text))
    for server_id in server_ids.values():
        for path in (f"/v1/servers/{server_id}", f"/v1/servers/{server_id}/warmup"):
            response = api.get(path, headers=tenant)
            seen.append((path, response.text + str(response.headers)))
    for path in ("/v1/servers", "/v1/messages?limit=500"):
        seen.append((path, api.get(path, headers=tenant).text))
    messages = asyncio.run(stack.tap.drain())
    routed = Counter(key.rsplit(".", 1)[-1] for key, _ in messages)
    # Every send job and every result went through the tap (more with the retried ones).
    assert routed["send-jobs"] >= 70
    assert routed["results"] >= 70
    seen.extend((f"broker {key}", body.decode(errors="replace")) for key, body in messages)
    assert all(text for _, text in seen)
    assert any("DEBUG" in text for where, text in seen if where == "registry.log")

    canaries = authority.issued_refresh_tokens
    assert len(canaries) >= 3, "two connections and a rotation issued refresh tokens"
    leaks = [
        where
        for where, text in seen
        for canary in canaries
        if canary in text or base64.b64encode(canary.encode()).decode() in text
    ]
    assert leaks == []
    print(
        f"accepted when the tokens were ended: {dict(at_expiry)}; tokens refused at the SMTP "
        f"server: {recorder.refused_tokens}; broker messages searched: {dict(routed)}; "
        f"log bytes searched: {sum(s.log.stat().st_size for s in stack.services)}"
    )


# Refresh once across registry replicas -------------------------------------------------------


@contextmanager
def two_registries(
    database_url: str, certs: Certificates, tmp_path: Path
) -> Iterator[tuple[list[Service], AuthorizationServer, Settings]]:
    asyncio.run(truncate_postgres(database_url))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = make_settings(database_url, queue_prefix=f"abl-rep-{uuid.uuid4().hex[:8]}")
    with (
        authorization_server(certs, tmp_path, f"{base}/v1/oauth/callback") as authority,
        smtp_server(
            certs, {}, recorder=XOAuth2Recorder(authority), exclude_auth=("LOGIN", "PLAIN")
        ) as smtp,
    ):
        env = service_env(
            settings,
            SSL_CERT_FILE=certs.ca_file,
            ABL_AMQP_URL=AMQP_URL,
            **oauth_env(authority, smtp.port, base),
        )
        replicas: list[Service] = []
        try:
            replicas.append(start("registry-a", "registry", env, tmp_path, port=port))
            replicas.append(start("registry-b", "registry", env, tmp_path, args=("--no-migrate",)))
            yield replicas, authority, settings
        finally:
            for replica in replicas:
                replica.stop()
            asyncio.run(delete_queues(AMQP_URL, settings))


async def expire_in_the_registry(url: str, server_id: str) -> None:
    """Test set-up: the stored access token's expiry moved into the past, as time would."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "UPDATE smtp_servers SET access_token_expires_at = now() - interval '1 minute' "
            "WHERE id = $1",
            uuid.UUID(server_id),
        )
    finally:
        await connection.close()


async def ask_all(
    replicas: list[Service], token: str, server_id: str, per_replica: int, rejected: str | None
) -> list[dict[str, Any]]:
    """`per_replica` concurrent credential requests to each replica at once."""
    headers = {"Authorization": f"Bearer {token}"}
    path = f"/internal/v1/servers/{server_id}/credentials"
    clients = [httpx.AsyncClient(base_url=r.url, timeout=60, headers=headers) for r in replicas]
    try:

        async def one(client: httpx.AsyncClient) -> dict[str, Any]:
            if rejected is None:
                response = await client.get(path)
            else:
                body = {"rejected_token_sha256": rejected}
                response = await client.post(f"{path}/refresh", json=body)
            assert response.status_code == 200, response.text
            answer: dict[str, Any] = response.json()
            return answer

        return await asyncio.gather(
            *(one(client) for client in clients for _ in range(per_replica))
        )
    finally:
        for client in clients:
            await client.aclose()


def test_two_registry_replicas_refresh_a_token_once(
    migrated_postgres: str, certs: Certificates, tmp_path: Path
) -> None:
    with two_registries(migrated_postgres, certs, tmp_path) as (replicas, authority, settings):
        api = httpx.Client(base_url=replicas[0].url, timeout=60)
        tenant = new_tenant(api, settings.admin_token.get_secret_value())
        server_id = connect(api, authority, tenant, "o2@example.com", "microsoft")["server_id"]
        internal = settings.internal_token.get_secret_value()
        # A slow provider: every request below arrives while the first refresh is under way.
        authority.refresh_delay = 1.0

        # The stored token has run out: 30 look-ups at each replica (more than a replica's
        # database pool), all at once.
        asyncio.run(expire_in_the_registry(settings.database_url, server_id))
        started = time.monotonic()
        answers = asyncio.run(ask_all(replicas, internal, server_id, 30, None))
        tokens = {answer["access_token"] for answer in answers}
        assert len(answers) == 60
        assert len(tokens) == 1, "the replicas handed out different tokens"
        fresh = tokens.pop()
        assert authority.token_valid("o2@example.com", fresh)
        assert authority.refreshes["o2@example.com"] == 1
        assert time.monotonic() - started < 30, "requests waited on an exhausted pool"

        # The provider ended that token early; senders report it refused, at both replicas.
        authority.expire_tokens("o2@example.com")
        answers = asyncio.run(ask_all(replicas, internal, server_id, 30, token_digest(fresh)))
        tokens = {answer["access_token"] for answer in answers}
        assert len(tokens) == 1
        newer = tokens.pop()
        assert newer != fresh
        assert authority.token_valid("o2@example.com", newer)
        assert authority.refreshes["o2@example.com"] == 2

        # The replicas' metrics agree: two refreshes between them.
        total = sum(
            metric(
                httpx.get(f"{replica.url}/metrics", timeout=30).text,
                "abl_oauth_token_refreshes_total",
                provider="microsoft",
                outcome="ok",
            )
            for replica in replicas
        )
        assert total == 2
