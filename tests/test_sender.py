"""The sender end to end in one process: scheduler loop, in-process bus, sender worker, and a
real SMTP server (STARTTLS, AUTH) scripted to answer 4xx, 5xx, 535 and quota replies, to hang,
and to drop the line before and after the final '.'. Each outcome is asserted at the SMTP server
and in the email's status, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import update

from services.scheduler.models import Email
from shared.broker import Delivery, InProcessBus, dead_letter_queue, parked_queue
from shared.db import table_of
from shared.settings import Settings
from tests.conftest import Api, make_settings, running
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server

LOGINS = {
    "alice@example.com": "alice-pw",
    "bob@example.com": "bob-pw",
    "carol@example.com": "carol-pw",
    "quota@example.com": "quota-pw",
}


@pytest.fixture
def smtp(certs: Certificates) -> Iterator[SmtpTestServer]:
    with smtp_server(certs, LOGINS, security="starttls") as server:
        yield server


@pytest.fixture
def sender_settings(database_url: str) -> Settings:
    return make_settings(
        database_url,
        tick_seconds=0.1,
        retry_base_seconds=0.0,
        retry_cap_seconds=0.0,
        max_attempts=3,
        sender_data_timeout_seconds=1.5,
        credentials_ttl_seconds=0.0,
    )


@pytest.fixture
async def live(sender_settings: Settings) -> AsyncIterator[Api]:
    async with running(sender_settings, combined=True, loops=True) as api:
        yield api


async def add(api: Api, tenant: dict[str, str], smtp: SmtpTestServer, login: str) -> str:
    body = {
        "host": "localhost",
        "port": smtp.port,
        "security": "starttls",
        "username": login,
        "password": LOGINS[login],
        "from_email": login,
        "from_name": login.split("@")[0],
    }
    response = await api.client.post("/v1/servers", json=body, headers=tenant)
    assert response.status_code == 201, response.text
    server_id: str = response.json()["id"]
    return server_id


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def email(api: Api, tenant: dict[str, str], email_id: str) -> dict[str, Any]:
    body: dict[str, Any] = (await api.client.get(f"/v1/messages/{email_id}", headers=tenant)).json()
    return body


async def send(api: Api, tenant: dict[str, str], *recipients: str) -> list[str]:
    items = [
        {"to": to, "subject": f"Hi {i}", "text": "Hello\n.\nA line with a dot."}
        for i, to in enumerate(recipients)
    ]
    response = await api.client.post("/v1/messages", json={"messages": items}, headers=tenant)
    assert response.status_code == 202, response.text
    ids: list[str] = response.json()["ids"]
    return ids


async def finished(api: Api, tenant: dict[str, str], ids: list[str], *states: str) -> None:
    async def check() -> bool:
        for email_id in ids:
            if (await email(api, tenant, email_id))["status"] not in states:
                return False
        return True

    await eventually(check)


async def test_three_servers_thirty_emails_ten_accepted_by_each_account(
    live: Api, smtp: SmtpTestServer
) -> None:
    tenant = await live.new_tenant()
    for login in ("alice@example.com", "bob@example.com", "carol@example.com"):
        await add(live, tenant, smtp, login)
    ids = await send(live, tenant, *(f"ok+{i}@example.org" for i in range(30)))
    await finished(live, tenant, ids, "sent")
    assert dict(smtp.recorder.accepted) == {
        "alice@example.com": 10,
        "bob@example.com": 10,
        "carol@example.com": 10,
    }
    sample = smtp.recorder.messages[0]
    raw = bytes(sample.original_content or b"")
    assert b"Message-ID: <abl." in raw
    assert b"\r\n..\r\n" not in raw  # dot-stuffing undone by the server
    assert b"\r\n.\r\nA line with a dot." in raw
    one = await email(live, tenant, ids[0])
    assert one["last_smtp_code"] == 250
    assert one["sent_at"] is not None


async def test_recipient_refused_for_good_fails_without_retry(
    live: Api, smtp: SmtpTestServer
) -> None:
    tenant = await live.new_tenant()
    await add(live, tenant, smtp, "alice@example.com")
    (email_id,) = await send(live, tenant, "rcpt550+x@example.org")
    await finished(live, tenant, [email_id], "failed")
    body = await email(live, tenant, email_id)
    assert (body["last_smtp_code"], body["attempts"]) == (550, 0)
    assert "does not exist" in body["last_smtp_reply"]
    assert smtp.recorder.messages == []


@pytest.mark.parametrize("script", ["rcpt451", "data451", "dropbefore"])
async def test_transient_failures_retry_then_fail_after_the_bounded_attempts(
    live: Api, smtp: SmtpTestServer, script: str
) -> None:
    tenant = await live.new_tenant()
    server_id = await add(live, tenant, smtp, "alice@example.com")
    (email_id,) = await send(live, tenant, f"{script}+x@example.org")
    await finished(live, tenant, [email_id], "failed")
    body = await email(live, tenant, email_id)
    assert body["attempts"] == live.settings.max_attempts
    assert smtp.recorder.messages == []
    warmup = (await live.client.get(f"/v1/servers/{server_id}/warmup", headers=tenant)).json()
    # An attempt that failed before the data was complete keeps no reservation; one refused
    # after the final '.' was seen by the server, so it counts (the conservative choice).
    kept = live.settings.max_attempts if script == "data451" else 0
    assert (warmup["reserved_today"], warmup["sent_today"]) == (kept, 0)


@pytest.mark.parametrize("script", ["dropafter", "hang"])
async def test_line_lost_after_the_final_dot_is_unknown_and_never_resent(
    live: Api, smtp: SmtpTestServer, script: str
) -> None:
    tenant = await live.new_tenant()
    server_id = await add(live, tenant, smtp, "alice@example.com")
    (email_id,) = await send(live, tenant, f"{script}+x@example.org")
    await finished(live, tenant, [email_id], "unknown")
    await asyncio.sleep(0.5)  # several ticks: nothing sends it again
    body = await email(live, tenant, email_id)
    assert (body["status"], body["attempts"]) == ("unknown", 0)
    if script == "dropafter":
        assert len(smtp.recorder.messages) == 1
    warmup = (await live.client.get(f"/v1/servers/{server_id}/warmup", headers=tenant)).json()
    assert warmup["reserved_today"] == 1  # it may have left: it counts


async def test_quota_reply_parks_the_server_and_the_email_leaves_through_another(
    live: Api, smtp: SmtpTestServer
) -> None:
    tenant = await live.new_tenant()
    quota_server = await add(live, tenant, smtp, "quota@example.com")
    await add(live, tenant, smtp, "bob@example.com")
    ids = await send(live, tenant, *(f"ok+{i}@example.org" for i in range(4)))
    await finished(live, tenant, ids, "sent")
    assert dict(smtp.recorder.accepted) == {"bob@example.com": 4}
    warmup = (await live.client.get(f"/v1/servers/{quota_server}/warmup", headers=tenant)).json()
    assert warmup["parked_until"] is not None


async def test_auth_failure_marks_the_server_and_its_emails_go_elsewhere(
    live: Api, smtp: SmtpTestServer
) -> None:
    tenant = await live.new_tenant()
    broken = await add(live, tenant, smtp, "alice@example.com")
    await add(live, tenant, smtp, "bob@example.com")
    smtp.recorder.accounts["alice@example.com"] = "changed-at-the-provider"
    ids = await send(live, tenant, *(f"ok+{i}@example.org" for i in range(6)))
    await finished(live, tenant, ids, "sent")
    assert dict(smtp.recorder.accepted) == {"bob@example.com": 6}
    server = (await live.client.get(f"/v1/servers/{broken}", headers=tenant)).json()
    assert server["status"] == "auth_failed"
    assert "535" in server["last_check"]["reply"]


async def test_a_redelivered_job_of_a_sent_email_is_not_sent_again(
    live: Api, smtp: SmtpTestServer
) -> None:
    tenant = await live.new_tenant()
    await add(live, tenant, smtp, "alice@example.com")
    bus: InProcessBus = live.app.state.bus
    captured: list[bytes] = []
    original = bus.publish

    async def spy(
        queue: str, body: bytes, *, message_id: str, expires_in: float | None = None
    ) -> None:
        if queue == live.settings.send_jobs_queue:
            captured.append(body)
        await original(queue, body, message_id=message_id, expires_in=expires_in)

    bus.publish = spy  # type: ignore[method-assign]
    (email_id,) = await send(live, tenant, "ok+once@example.org")
    await finished(live, tenant, [email_id], "sent")
    worker = live.app.state.worker
    # Back at the sender that reported it: known without asking.
    await worker.handle(Delivery(captured[0], "again", 2, redelivered=True))
    # At another sender (one that does not remember it): the scheduler says it was sent.
    worker.reported.clear()
    await worker.handle(Delivery(captured[0], "again", 3, redelivered=True))
    assert len(smtp.recorder.messages) == 1


async def test_an_unparsable_job_is_dead_lettered_then_parked_for_an_operator(live: Api) -> None:
    bus: InProcessBus = live.app.state.bus
    await bus.publish(live.settings.send_jobs_queue, b"{not json", message_id="bad")
    # The sender dead-letters it; the scheduler, which settles dead letters, cannot parse it
    # either and keeps it where an operator finds it.
    parked = parked_queue(dead_letter_queue(live.settings.send_jobs_queue))

    async def dead() -> bool:
        return [e.body for e in bus.parked.get(parked, [])] == [b"{not json"]

    await eventually(dead)


async def test_an_email_that_cannot_be_built_ends_failed_not_dead_lettered(
    live: Api, smtp: SmtpTestServer
) -> None:
    """Intake refuses separators; an email stored before that rule (here: changed in the
    database) must still end `failed` with the reason, with nothing sent and no dead letter."""
    tenant = await live.new_tenant()
    server_id = await add(live, tenant, smtp, "alice@example.com")
    await live.client.post(f"/v1/servers/{server_id}/pause", headers=tenant)
    (email_id,) = await send(live, tenant, "ok@example.org")
    async with live.app.state.sessions() as session, session.begin():
        emails = table_of(Email)
        await session.exec(
            update(emails)
            .where(emails.c.id == uuid.UUID(email_id))
            .values(to="ok@exa\u2028mple.org")
        )
    await live.client.post(f"/v1/servers/{server_id}/resume", headers=tenant)
    await finished(live, tenant, [email_id], "failed")
    final = await email(live, tenant, email_id)
    assert "cannot be built" in final["last_smtp_reply"]
    assert smtp.recorder.messages == []
    bus: InProcessBus = live.app.state.bus
    assert bus.dead_letters(live.settings.send_jobs_queue) == []


async def test_canceling_a_scheduled_email_stops_the_sender_that_holds_its_job(
    sender_settings: Settings, certs: Certificates
) -> None:
    settings = sender_settings.model_copy(update={"sender_connections_per_server": 1})
    # One connection and a slow server: the last jobs wait at the sender while it sends.
    with smtp_server(certs, LOGINS, security="starttls", data_delay=0.4) as slow:
        async with running(settings, combined=True, loops=True) as live:
            tenant = await live.new_tenant()
            server_id = await add(live, tenant, slow, "alice@example.com")
            ids = await send(live, tenant, *(f"ok+{i}@example.org" for i in range(5)))

            async def first_accepted() -> bool:
                return len(slow.recorder.messages) >= 1

            await eventually(first_accepted)
            assert (await email(live, tenant, ids[-1]))["status"] == "scheduled"
            canceled = await live.client.post(f"/v1/messages/{ids[-1]}/cancel", headers=tenant)
            assert canceled.json()["status"] == "canceled"
            await finished(live, tenant, ids[:-1], "sent")
            await finished(live, tenant, ids[-1:], "canceled")

            async def reservation_back() -> bool:
                url = f"/v1/servers/{server_id}/warmup"
                reserved: int = (await live.client.get(url, headers=tenant)).json()[
                    "reserved_today"
                ]
                return reserved == 4

            await eventually(reservation_back)
            assert sorted(e.rcpt_tos[0] for e in slow.recorder.messages) == [
                f"ok+{i}@example.org" for i in range(4)
            ]
