"""Webhooks in one process, on SQLite and PostgreSQL: endpoints and their secret, the SSRF rules
of server checks applied to URLs, and events delivered to a receiver on loopback that verifies
every signature with the published algorithm."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlmodel import select

from services.registry.models import Tenant
from services.scheduler.dispatcher import schedule_from
from services.scheduler.models import ServerDay, ServerWarmup
from services.webhooks import delivery
from services.webhooks.delivery import Intake, fan_out
from services.webhooks.keys import reencrypt_secrets
from services.webhooks.models import WebhookEndpoint, WebhookMessage
from shared.broker import Delivery
from shared.crypto import Keyring, generate_key
from shared.db import create_engine, session_factory
from shared.events import Event, EventType
from shared.settings import decode_key
from shared.tenancy import hash_api_key
from shared.timeutil import utcnow
from tests.conftest import ACCOUNTS, Api, make_settings, running, truncate_postgres
from tests.support import mailbox_messages as mail
from tests.support.dovecot import DovecotServer
from tests.support.receiver import Receiver, receiver
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server
from tests.test_scheduler_api import add_servers, emails, warm_up

FAST = {
    "tick_seconds": 0.05,
    "outbox_poll_seconds": 0.1,
    "webhook_tick_seconds": 0.05,
    "webhook_retry_base_seconds": 0.05,
    "webhook_retry_cap_seconds": 0.2,
    "retry_base_seconds": 0,
    "retry_cap_seconds": 0,
}


@asynccontextmanager
async def product(database_url: str, **overrides: Any) -> AsyncIterator[Api]:
    settings = make_settings(database_url, **(FAST | overrides))
    async with running(settings, combined=True, loops=True) as api:
        yield api


@pytest.fixture
def hook() -> Iterator[Receiver]:
    with receiver() as state:
        yield state


async def wait_for(check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def register(api: Api, tenant: dict[str, str], hook: Receiver, **body: Any) -> dict[str, Any]:
    response = await api.client.post("/v1/webhooks", json={"url": hook.url} | body, headers=tenant)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    hook.secret = created["secret"]
    return created


async def test_only_events_an_endpoint_wants_are_stored(database_url: str, hook: Receiver) -> None:
    """A tenant without endpoints (most of them) costs no webhook row per email."""
    async with product(database_url) as api:
        quiet, listening = await api.new_tenant("quiet"), await api.new_tenant("listening")
        await register(api, listening, hook, event_types=["email.sent"])
        ids = {name: await tenant_id(api, key) for name, key in (("q", quiet), ("l", listening))}
        events = [
            Event(type=EventType(kind), tenant_id=ids[who], data={"email_id": str(uuid.uuid4())})
            for who in ("q", "l")
            for kind in ("email.sent", "email.failed")
        ]
        async with api.app.state.sessions() as session, session.begin():
            added = await fan_out(session, events, timedelta(days=1))
            stored = (await session.exec(select(WebhookMessage.id))).all()
        assert added == 1
        assert stored == [events[2].id]  # the listening tenant's email.sent only


async def test_an_event_that_cannot_be_stored_fails_alone(
    database_url: str, hook: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events arriving together are stored in one transaction; when that fails, each is
    tried alone, so only the bad one goes back to the broker (and towards its delivery
    limit)."""
    async with product(database_url) as api:
        key = await api.new_tenant("acme")
        await register(api, key, hook, event_types=["email.sent"])
        tenant = await tenant_id(api, key)
        events = [
            Event(type=EventType.email_sent, tenant_id=tenant, data={"n": n}) for n in range(5)
        ]
        poisoned = events[2].id

        async def fan_out_refusing_one(session: Any, batch: list[Event], *args: Any) -> int:
            if any(e.id == poisoned for e in batch):
                raise RuntimeError("cannot store this one")
            return await fan_out(session, batch, *args)

        monkeypatch.setattr(delivery, "fan_out", fan_out_refusing_one)
        intake = Intake(api.app.state.sessions, api.settings)
        outcomes = await asyncio.gather(
            *(intake.handle(Delivery(e.encode(), e.id, 1)) for e in events),
            return_exceptions=True,
        )
        assert [isinstance(o, RuntimeError) for o in outcomes] == [False, False, True, False, False]
        async with api.app.state.sessions() as session:
            stored = set((await session.exec(select(WebhookMessage.id))).all())
        assert stored == {e.id for e in events} - {poisoned}


async def test_an_endpoint_shows_its_secret_once_and_only_to_its_tenant(
    database_url: str, hook: Receiver
) -> None:
    async with product(database_url) as api:
        acme, other = await api.new_tenant("acme"), await api.new_tenant("other")
        created = await register(api, acme, hook, event_types=["email.sent", "email.sent"])
        assert created["secret"].startswith("whsec_")
        assert created["event_types"] == ["email.sent"]
        path = f"/v1/webhooks/{created['id']}"
        read = (await api.client.get(path, headers=acme)).json()
        assert "secret" not in read
        assert "secret_ciphertext" not in read
        assert created["secret"] not in (await api.client.get("/v1/webhooks", headers=acme)).text
        assert (await api.client.get(path, headers=other)).status_code == 404
        assert (await api.client.get("/v1/webhooks", headers=other)).json()["items"] == []
        patched = await api.client.patch(
            path, json={"enabled": False, "event_types": ["server.status_changed"]}, headers=acme
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["enabled"] is False
        assert patched.json()["event_types"] == ["server.status_changed"]
        assert (await api.client.delete(path, headers=other)).status_code == 404
        assert (await api.client.delete(path, headers=acme)).status_code == 204
        assert (await api.client.get(path, headers=acme)).status_code == 404


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://127.0.0.1/hooks", "blocked_host"),
        ("https://169.254.169.254/latest/meta-data", "blocked_host"),
        ("https://[fd00:ec2::254]/", "blocked_host"),
        ("https://10.1.2.3:8443/x", "blocked_host"),
        ("https://100.100.100.200/", "blocked_host"),
        ("https://[::ffff:127.0.0.1]/", "blocked_host"),
        ("https://localhost/hooks", "blocked_host"),
        ("https://no-such-host.invalid/hooks", "dns_failed"),
        ("http://example.com/hooks", "insecure_url"),
        ("https://user:pw@example.com/hooks", "invalid_url"),
        ("ftp://example.com/hooks", "invalid_url"),
    ],
)
async def test_private_metadata_and_insecure_urls_are_refused(
    sqlite_url: str, url: str, code: str
) -> None:
    async with product(sqlite_url, allow_private_hosts=False) as api:
        tenant = await api.new_tenant()
        response = await api.client.post("/v1/webhooks", json={"url": url}, headers=tenant)
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["code"] == code
        assert problem["hint"]
        assert url not in response.text  # no error echoes the input
        if code in ("blocked_host", "dns_failed"):
            # The same code a server check gives for the same host.
            host = urlsplit(url).hostname
            server = await api.client.post(
                "/v1/servers",
                json={
                    "host": host,
                    "port": 587,
                    "security": "starttls",
                    "username": "u@example.com",
                    "password": "p",
                    "from_email": "u@example.com",
                },
                headers=tenant,
            )
            assert server.status_code == 422, server.text
            assert server.json()["code"] == code, server.text


@asynccontextmanager
async def one_server(
    database_url: str, certs: Certificates, hook: Receiver, *types: str
) -> AsyncIterator[tuple[Api, dict[str, str], str, SmtpTestServer]]:
    """The product, a tenant with an endpoint for `types` on `hook`, and one server (on an
    SMTP server of its own, login a1@example.com)."""
    accounts = {"a1@example.com": "a1-pw"}
    with smtp_server(certs, accounts) as smtp:
        async with product(database_url) as api:
            tenant = await api.new_tenant()
            await register(api, tenant, hook, event_types=list(types))
            server_id = (await add_servers(api, tenant, smtp, accounts))[0]
            yield api, tenant, server_id, smtp


async def test_an_auth_failure_sends_one_server_status_changed(
    database_url: str, certs: Certificates, hook: Receiver
) -> None:
    async with one_server(database_url, certs, hook, "server.status_changed") as (
        api,
        tenant,
        server_id,
        smtp,
    ):
        await warm_up(api, [server_id])
        smtp.recorder.accounts["a1@example.com"] = "changed"  # the mailbox's password changed
        response = await api.client.post("/v1/messages", json=emails(10), headers=tenant)
        assert response.status_code == 202
        await wait_for(lambda: len(hook.of_type("server.status_changed")) >= 1)
        await asyncio.sleep(1.0)  # time for a second event, were there one
        changes = hook.of_type("server.status_changed")
        assert [c.data["status"] for c in changes] == ["auth_failed"]
        assert changes[0].data["server_id"] == server_id
        assert changes[0].data["previous_status"] == "active"
        # Pause and resume are status changes too: one event each.
        for action in ("pause", "resume"):
            done = await api.client.post(f"/v1/servers/{server_id}/{action}", headers=tenant)
            assert done.status_code == 200, done.text
        await wait_for(lambda: len(hook.of_type("server.status_changed")) == 3)
        # In the order the changes were made, not the order they arrived: deliveries due
        # together are posted concurrently (the cause of this test's rare failure).
        changes = sorted(hook.of_type("server.status_changed"), key=lambda c: c.timestamp)
        assert [c.data["status"] for c in changes] == ["auth_failed", "paused", "auth_failed"]
        assert hook.bad_signatures == 0


async def test_an_endpoint_failing_for_days_is_disabled_and_the_tenant_told(
    sqlite_url: str,
) -> None:
    with receiver() as broken, receiver() as healthy:
        broken.answer = lambda: 500
        async with product(sqlite_url, webhook_disable_after_seconds=0.5) as api:
            tenant = await api.new_tenant()
            failing = await register(api, tenant, broken)
            await register(api, tenant, healthy, event_types=["server.status_changed"])
            await api.app.state.webhook_intake.handle(
                delivery_of(await tenant_id(api, tenant), "server.warmup_step")
            )
            path = f"/v1/webhooks/{failing['id']}"

            async def disabled() -> bool:
                body = (await api.client.get(path, headers=tenant)).json()
                return body["enabled"] is False

            deadline = time.monotonic() + 30
            while not await disabled():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            endpoint = (await api.client.get(path, headers=tenant)).json()
            assert endpoint["disabled_reason"].startswith("every delivery failed since")
            await wait_for(lambda: len(healthy.of_type("webhook.endpoint_disabled")) == 1)
            notice = healthy.of_type("webhook.endpoint_disabled")[0]
            assert notice.data["endpoint_id"] == failing["id"]
            assert notice.data["status"] == "disabled"
            # The log says what the endpoint answered.
            log = (await api.client.get(f"{path}/deliveries", headers=tenant)).json()["items"]
            assert log
            assert log[0]["last_status_code"] == 500
            assert log[0]["attempts"] >= 2
            # Enabled again with a working receiver, the waiting delivery goes out.
            broken.answer = lambda: 200
            again = await api.client.patch(path, json={"enabled": True}, headers=tenant)
            assert again.json()["disabled_reason"] is None
            await wait_for(lambda: len(broken.accepted) == 1)
            assert broken.bad_signatures == healthy.bad_signatures == 0
            # Every attempt is in the delivery's own log, in order, the last one the 200.
            delivery = f"{path}/deliveries/{log[0]['id']}"
            deadline = time.monotonic() + 30
            while (await api.client.get(f"{path}/deliveries", headers=tenant)).json()["items"][0][
                "status"
            ] != "delivered":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            attempts = (await api.client.get(f"{delivery}/attempts", headers=tenant)).json()
            codes = [a["status_code"] for a in attempts["items"]]
            assert codes[-1] == 200
            assert set(codes[:-1]) == {500}
            assert len(codes) >= 3
            assert [a["attempt"] for a in attempts["items"]] == list(range(1, len(codes) + 1))
            assert all(a["duration_seconds"] >= 0 for a in attempts["items"])
            other = await api.client.get(f"{delivery}/attempts", headers=await api.new_tenant("x"))
            assert other.status_code == 404


async def tenant_id(api: Api, tenant: dict[str, str]) -> uuid.UUID:
    digest = hash_api_key(tenant["Authorization"].removeprefix("Bearer "))
    async with api.app.state.sessions() as session:
        found = (await session.exec(select(Tenant).where(Tenant.api_key_hash == digest))).one()
    value: uuid.UUID = found.id
    return value


def delivery_of(tenant: uuid.UUID, kind: str) -> Delivery:
    event = Event(type=EventType(kind), tenant_id=tenant, data={"server_id": str(uuid.uuid4())})
    return Delivery(event.encode(), event.id, 1)


async def test_30_emails_give_30_email_sent_events_each_once_through_a_failing_receiver(
    database_url: str, certs: Certificates, hook: Receiver
) -> None:
    # The receiver answers 500 for its first 40 requests, then 200: every event still arrives,
    # each once by webhook-id (a retried event keeps its id).
    calls = {"n": 0}

    def flaky() -> int:
        calls["n"] += 1
        return 500 if calls["n"] <= 40 else 200

    hook.answer = flaky
    accounts = {"a1@example.com": "a1-pw", "a2@example.com": "a2-pw", "a3@example.com": "a3-pw"}
    with smtp_server(certs, accounts) as smtp:
        async with product(database_url) as api:
            tenant = await api.new_tenant()
            await register(api, tenant, hook, event_types=["email.sent", "email.failed"])
            server_ids = await add_servers(api, tenant, smtp, accounts)
            await warm_up(api, server_ids)
            accepted = await api.client.post(
                "/v1/messages", json=emails(30, campaign="nov"), headers=tenant
            )
            assert accepted.status_code == 202, accepted.text
            ids = set(accepted.json()["ids"])
            await wait_for(lambda: len(hook.of_type("email.sent")) >= 30, seconds=60)
            await asyncio.sleep(0.5)  # time for a duplicate, were there one
            sent = hook.of_type("email.sent")
            assert len(sent) == 30
            assert len({s.id for s in sent}) == 30
            assert {s.data["email_id"] for s in sent} == ids
            assert {s.data["campaign"] for s in sent} == {"nov"}
            assert {s.data["server_id"] for s in sent} <= set(server_ids)
            assert hook.answered[500] == 40
            assert hook.bad_signatures == 0


async def test_a_receiver_down_for_a_minute_loses_nothing(
    migrated_postgres: str, certs: Certificates, hook: Receiver
) -> None:
    """The receiver answers 500 for a whole minute while 30 emails go out, then 200: with the
    production backoff shape (first retry after 1 s, doubling, capped at 15 s), every
    `email.sent` arrives once the receiver is back, each once by webhook-id."""
    await truncate_postgres(migrated_postgres)
    back_at = time.monotonic() + 60
    hook.answer = lambda: 500 if time.monotonic() < back_at else 200
    accounts = {"a1@example.com": "a1-pw", "a2@example.com": "a2-pw", "a3@example.com": "a3-pw"}
    with smtp_server(certs, accounts) as smtp:
        async with product(
            migrated_postgres, webhook_retry_base_seconds=1.0, webhook_retry_cap_seconds=15.0
        ) as api:
            tenant = await api.new_tenant()
            await register(api, tenant, hook, event_types=["email.sent"])
            server_ids = await add_servers(api, tenant, smtp, accounts)
            await warm_up(api, server_ids)
            accepted = await api.client.post("/v1/messages", json=emails(30), headers=tenant)
            assert accepted.status_code == 202, accepted.text
            await wait_for(lambda: hook.answered[500] >= 30, seconds=30)
            assert hook.of_type("email.sent") == []  # nothing counted while it failed
            await wait_for(lambda: len(hook.of_type("email.sent")) >= 30, seconds=120)
            await asyncio.sleep(1)  # time for a duplicate, were there one
            sent = hook.of_type("email.sent")
            assert time.monotonic() >= back_at
            assert len({s.id for s in sent}) == len(sent) == 30
            assert {s.data["email_id"] for s in sent} == set(accepted.json()["ids"])
            assert hook.bad_signatures == 0


async def test_a_warmup_step_is_announced_once_per_server_and_step(
    database_url: str, certs: Certificates, hook: Receiver
) -> None:
    async with one_server(database_url, certs, hook, "server.warmup_step") as (
        api,
        tenant,
        server_id,
        _,
    ):
        schedule = schedule_from(api.settings)
        yesterday = utcnow().date() - timedelta(days=1)
        # Yesterday at step 3 it sent its whole allowance: today it is at step 4.
        async with api.app.state.sessions() as session, session.begin():
            owner = await tenant_id(api, tenant)
            session.add(
                ServerWarmup(
                    server_id=uuid.UUID(server_id),
                    tenant_id=owner,
                    step=3,
                    state_day=yesterday,
                )
            )
            session.add(
                ServerDay(
                    server_id=uuid.UUID(server_id),
                    tenant_id=owner,
                    day=yesterday,
                    allowance=schedule.allowance(3),
                    sent=schedule.allowance(3),
                )
            )
        path = f"/v1/servers/{server_id}/warmup"
        # Several readers fold the same new day at once (each GET writes the fold).
        answers = await asyncio.gather(*(api.client.get(path, headers=tenant) for _ in range(4)))
        assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
        assert {a.json()["step"] for a in answers} == {4}
        await wait_for(lambda: len(hook.of_type("server.warmup_step")) >= 1)
        await api.app.state.dispatcher.tick()
        assert (await api.client.get(path, headers=tenant)).json()["step"] == 4
        await asyncio.sleep(1.0)  # time for a second event, were there one
        steps = hook.of_type("server.warmup_step")
        assert len(steps) == 1
        assert steps[0].data == {
            "server_id": server_id,
            "day": utcnow().date().isoformat(),
            "step": 4,
            "previous_step": 3,
            "allowance": schedule.allowance(4),
            "previous_allowance": schedule.allowance(3),
            "top_step": schedule.top_step(),
        }
        assert answers[0].json()["allowance_today"] == schedule.allowance(4)
        assert hook.bad_signatures == 0


async def test_a_quota_park_and_its_end_are_announced_once_each(
    database_url: str, certs: Certificates, hook: Receiver
) -> None:
    # Logins starting with "quota" are refused with the provider's quota reply.
    accounts = {"quota@example.com": "quota-pw", "ok@example.com": "ok-pw"}
    with smtp_server(certs, accounts) as smtp:
        async with product(database_url) as api:
            tenant = await api.new_tenant()
            await register(api, tenant, hook, event_types=["server.status_changed", "email.sent"])
            quota_id, ok_id = await add_servers(api, tenant, smtp, accounts)
            await warm_up(api, [quota_id, ok_id])
            accepted = await api.client.post("/v1/messages", json=emails(12), headers=tenant)
            assert accepted.status_code == 202, accepted.text
            await wait_for(lambda: len(hook.of_type("email.sent")) == 12, seconds=60)
            await asyncio.sleep(0.5)
            changes = hook.of_type("server.status_changed")
            assert [(c.data["server_id"], c.data["status"]) for c in changes] == [
                (quota_id, "parked")
            ]
            assert changes[0].data["previous_status"] == "active"
            assert changes[0].data["reason"] == "quota"
            until = datetime.fromisoformat(changes[0].data["until"])
            assert until > utcnow()
            # The quota window ends: the next sweep announces the server active again, once.
            scheduler = api.app.state.dispatcher
            await scheduler.unpark(until - timedelta(seconds=1))
            await scheduler.unpark(until + timedelta(seconds=1))
            await scheduler.unpark(until + timedelta(seconds=2))
            await wait_for(lambda: len(hook.of_type("server.status_changed")) >= 2)
            await asyncio.sleep(0.5)
            changes = hook.of_type("server.status_changed")
            assert [(c.data["server_id"], c.data["status"]) for c in changes] == [
                (quota_id, "parked"),
                (quota_id, "active"),
            ]
            assert changes[1].data["previous_status"] == "parked"
            assert hook.bad_signatures == 0


async def test_bounces_and_replies_read_from_the_mailbox_are_announced(
    database_url: str, starttls_server: SmtpTestServer, dovecot: DovecotServer, hook: Receiver
) -> None:
    async with product(database_url, inbox_poll_seconds=0.2, inbox_timeout_seconds=5.0) as api:
        tenant = await api.new_tenant()
        await register(
            api, tenant, hook, event_types=["email.sent", "email.bounced", "email.replied"]
        )
        imap = {"host": "localhost", "port": dovecot.tls_port}
        server_ids = await add_servers(api, tenant, starttls_server, imap=imap)
        mailbox = dict(zip(server_ids, ACCOUNTS, strict=True))
        await warm_up(api, server_ids)
        run = uuid.uuid4().hex[:6]
        leads = [f"lead{i}.{run}@example.org" for i in range(3)]
        accepted = await api.client.post(
            "/v1/messages",
            json={"messages": [{"to": lead, "subject": "Hi", "text": "x"} for lead in leads]},
            headers=tenant,
        )
        ids = accepted.json()["ids"]
        await wait_for(lambda: len(hook.of_type("email.sent")) == 3, seconds=60)
        server_of = {s.data["email_id"]: s.data["server_id"] for s in hook.of_type("email.sent")}
        dovecot.append(mailbox[server_of[ids[0]]], mail.dsn(leads[0], mail.our_message_id(ids[0])))
        dovecot.append(
            mailbox[server_of[ids[1]]], mail.reply(leads[1], mail.our_message_id(ids[1]))
        )
        await wait_for(
            lambda: len(hook.of_type("email.bounced")) + len(hook.of_type("email.replied")) >= 2
        )
        await asyncio.sleep(1.0)  # several more polls: nothing is announced twice
        bounced, replied = hook.of_type("email.bounced"), hook.of_type("email.replied")
        assert [b.data["email_id"] for b in bounced] == [ids[0]]
        assert bounced[0].data["status"] == "bounced"
        assert bounced[0].data["bounce_status"] == "5.1.1"
        assert "User unknown" in bounced[0].data["diagnostic"]
        assert bounced[0].data["server_id"] == server_of[ids[0]]
        assert [r.data["email_id"] for r in replied] == [ids[1]]
        assert replied[0].data["status"] == "replied"
        assert hook.bad_signatures == 0


async def test_a_rotated_secret_signs_beside_the_previous_one_for_a_day(
    database_url: str, hook: Receiver
) -> None:
    async with product(database_url) as api:
        tenant = await api.new_tenant()
        created = await register(api, tenant, hook)
        path = f"/v1/webhooks/{created['id']}"
        old = created["secret"]
        rotated = await api.client.post(f"{path}/rotate-secret", headers=tenant)
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["secret"]
        assert new.startswith("whsec_")
        assert new != old
        overlap = datetime.fromisoformat(rotated.json()["previous_secret_until"]) - utcnow()
        assert timedelta(hours=23, minutes=59) < overlap <= timedelta(hours=24)
        assert new not in (await api.client.get(path, headers=tenant)).text
        other = await api.new_tenant("other")
        assert (await api.client.post(f"{path}/rotate-secret", headers=other)).status_code == 404
        owner = await tenant_id(api, tenant)
        intake = api.app.state.webhook_intake

        async def deliver(secret: str) -> None:
            before = len(hook.accepted)
            hook.secret = secret
            await intake.handle(delivery_of(owner, "server.warmup_step"))
            await wait_for(lambda: len(hook.accepted) == before + 1)

        # Within the overlap, a receiver with either secret verifies; both sign each request.
        await deliver(old)
        await deliver(new)
        assert [r.signatures for r in hook.accepted] == [2, 2]
        assert hook.bad_signatures == 0
        # The day is over: only the new secret signs.
        async with api.app.state.sessions() as session, session.begin():
            endpoint = await session.get(WebhookEndpoint, uuid.UUID(created["id"]))
            assert endpoint is not None
            endpoint.previous_secret_until = utcnow() - timedelta(seconds=1)
        hook.secret = old
        await intake.handle(delivery_of(owner, "server.warmup_step"))
        await wait_for(lambda: hook.bad_signatures >= 1)
        hook.secret = new  # the receiver switches: the event, retried, verifies
        await wait_for(lambda: len(hook.accepted) == 3)
        assert hook.accepted[-1].signatures == 1


async def test_key_rotation_reencrypts_webhook_secrets_and_they_still_sign(
    database_url: str, hook: Receiver
) -> None:
    old_key, new_key = generate_key(), generate_key()
    async with product(database_url, encryption_keys=old_key) as api:
        tenant = await api.new_tenant()
        created = await register(api, tenant, hook)
        first = created["secret"]
        # One endpoint mid-rotation: its previous secret is re-encrypted too.
        rotated = await api.client.post(
            f"/v1/webhooks/{created['id']}/rotate-secret", headers=tenant
        )
        hook.secret = rotated.json()["secret"]
        owner = await tenant_id(api, tenant)
    keyring = Keyring.from_keys([decode_key(new_key), decode_key(old_key)])
    engine = create_engine(database_url)
    try:
        assert await reencrypt_secrets(session_factory(engine), keyring) == (1, 1)
        assert await reencrypt_secrets(session_factory(engine), keyring) == (1, 0)
    finally:
        await engine.dispose()
    # The old key is gone: every secret still opens, and both still sign.
    async with product(database_url, encryption_keys=new_key) as api:
        await api.app.state.webhook_intake.handle(delivery_of(owner, "server.warmup_step"))
        await wait_for(lambda: len(hook.accepted) == 1)
        assert hook.accepted[0].signatures == 2
        hook.secret = first
        await api.app.state.webhook_intake.handle(delivery_of(owner, "server.warmup_step"))
        await wait_for(lambda: len(hook.accepted) == 2)
        assert hook.bad_signatures == 0


async def test_queued_emails_stopped_by_a_suppression_are_announced(
    database_url: str, hook: Receiver
) -> None:
    async with product(database_url) as api:
        tenant = await api.new_tenant()
        await register(api, tenant, hook, event_types=["email.suppressed"])
        # No server yet: the emails wait in the queue.
        leads = ["gone@example.org", "Gone@example.org", "keep@example.org", "x@blocked.example"]
        accepted = await api.client.post(
            "/v1/messages",
            json={
                "messages": [
                    {"to": to, "subject": f"Hi {i}", "text": "x", "campaign": "c"}
                    for i, to in enumerate(leads)
                ]
            },
            headers=tenant,
        )
        assert accepted.status_code == 202, accepted.text
        ids = accepted.json()["ids"]
        for body in ({"address": "gone@example.org"}, {"domain": "blocked.example"}):
            added = await api.client.post("/v1/suppressions", json=body, headers=tenant)
            assert added.status_code == 201, added.text
        await wait_for(lambda: len(hook.of_type("email.suppressed")) >= 3)
        await asyncio.sleep(0.5)  # time for another, were there one
        stopped = hook.of_type("email.suppressed")
        assert sorted(s.data["email_id"] for s in stopped) == sorted([ids[0], ids[1], ids[3]])
        assert {(s.data["status"], s.data["campaign"]) for s in stopped} == {("suppressed", "c")}
        kept = await api.client.get(f"/v1/messages/{ids[2]}", headers=tenant)
        assert kept.json()["status"] == "queued"
        assert hook.bad_signatures == 0
