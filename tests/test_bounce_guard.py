"""The bounce-rate guard: the rule as a table, then a server crossing the threshold on bounces
read from a real Dovecot is paused and its next emails go to the tenant's other servers."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import select

from services.scheduler.domain import BounceGuard, bounce_verdict
from services.scheduler.inbox import MailboxReader
from services.scheduler.mailbox_source import HttpMailboxSource
from services.scheduler.models import Email, ServerDay, ServerWarmup
from shared.db import table_of
from shared.messages import Outcome
from shared.settings import Settings
from shared.timeutil import utcnow
from tests.conftest import Api, make_settings, running
from tests.support import mailbox_messages as mail
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpTestServer
from tests.test_mailbox_reader import add_servers_with_mailboxes, reader
from tests.test_mailbox_reader_faults import send
from tests.test_scheduler_api import dispatcher, published_jobs, result_for, warm_up

GUARD = BounceGuard(window=200, pause_ratio=0.05, complaint_ratio=0.001, min_sent=20)


@pytest.mark.parametrize(
    ("sent", "hard", "complaints", "paused"),
    [
        (200, 10, 0, False),  # exactly 5 %: not above
        (200, 11, 0, True),
        (30, 2, 0, True),  # 6.7 %
        (19, 5, 0, False),  # too few sends to judge
        (20, 2, 0, True),
        (200, 0, 1, True),  # 0.5 % complaints > 0.1 %
        (1000, 0, 1, False),  # at most the window is counted by the caller; 0.1 % is not above
        (0, 0, 0, False),
    ],
)
def test_the_guard_pauses_above_the_ratio(
    sent: int, hard: int, complaints: int, paused: bool
) -> None:
    assert (bounce_verdict(sent, hard, complaints, GUARD) is not None) is paused


async def as_if_sent_yesterday(api: Api) -> None:
    """Test set-up: move today's sends, counters and warmup state one day back."""
    day = timedelta(days=1)
    async with api.app.state.sessions() as session, session.begin():
        for email in (await session.exec(select(Email))).all():
            email.sent_at = email.sent_at - day if email.sent_at else None
            session.add(email)
        for warmup in (await session.exec(select(ServerWarmup))).all():
            warmup.state_day -= day
            session.add(warmup)
        days = table_of(ServerDay)
        for row in (await session.exec(select(ServerDay))).all():
            await session.exec(
                update(days)
                .where(days.c.server_id == row.server_id, days.c.day == row.day)
                .values(day=row.day - day)
            )


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, inbox_timeout_seconds=5.0, inbox_poll_seconds=0.001)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings, combined=True) as api:
        yield api


async def test_a_server_over_the_bounce_threshold_is_paused_and_others_take_its_emails(
    app: Api, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    tenant = await app.new_tenant()
    accounts = await add_servers_with_mailboxes(app, tenant, starttls_server, dovecot)
    await warm_up(app, list(accounts), step=5)  # 59 a day: room for 30 each, and to climb
    run = uuid.uuid4().hex[:6]
    batch = {
        "messages": [
            {"to": f"g{i}.{run}@example.org", "subject": "Hi", "text": "x"} for i in range(90)
        ]
    }
    await app.client.post("/v1/messages", json=batch, headers=tenant)
    await dispatcher(app).tick()
    jobs = published_jobs(app)
    for job in jobs:
        await app.app.state.result_applier.apply(result_for(job, Outcome.sent, data_completed=True))
    by_server: dict[str, list[uuid.UUID]] = {}
    for job in jobs:
        by_server.setdefault(str(job.server_id), []).append(job.email_id)
    bad, *good = sorted(by_server)
    assert len(by_server[bad]) == 30
    for email_id in by_server[bad][:3]:  # 3 of 30: 10 % > 5 %
        to = (await app.client.get(f"/v1/messages/{email_id}", headers=tenant)).json()["to"]
        dovecot.append(accounts[bad], mail.dsn(to, mail.our_message_id(email_id)))
    # One bounce on a good server stays under the threshold (1 of 30 is 3.3 %).
    first_good = by_server[good[0]][0]
    to = (await app.client.get(f"/v1/messages/{first_good}", headers=tenant)).json()["to"]
    dovecot.append(accounts[good[0]], mail.dsn(to, mail.our_message_id(first_good)))

    await reader(app).poll_all()
    paused = (await app.client.get(f"/v1/servers/{bad}", headers=tenant)).json()
    assert paused["status"] == "paused_bounces"
    assert "hard bounces 3 of the last 30 sent" in paused["status_reason"]
    for server_id in good:
        assert (await app.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()[
            "status"
        ] == "active"

    async def reputation(server_id: str) -> dict[str, Any]:
        warmup = await app.client.get(f"/v1/servers/{server_id}/warmup", headers=tenant)
        value: dict[str, Any] = warmup.json()["reputation"]
        return value

    assert await reputation(bad) == {
        "sample": 30,
        "bounce_rate": 0.1,
        "complaint_rate": 0.0,
        "bounce_pause_ratio": 0.05,
        "complaint_pause_ratio": 0.001,
        "bounced_today": 3,
        "climb_held_today": True,
    }
    clean = await reputation(good[1])
    assert (clean["bounce_rate"], clean["climb_held_today"]) == (0.0, False)
    # The day ends: the server whose bounce rate passed half the threshold stays on its step,
    # the clean one (30 sent of 59, over half its allowance) climbs.
    await as_if_sent_yesterday(app)
    steps = {
        server_id: (await app.client.get(f"/v1/servers/{server_id}/warmup", headers=tenant)).json()[
            "step"
        ]
        for server_id in (bad, good[1])
    }
    assert steps == {bad: 5, good[1]: 6}

    more = {
        "messages": [
            {"to": f"m{i}.{run}@example.org", "subject": "Hi", "text": "x"} for i in range(30)
        ]
    }
    await app.client.post("/v1/messages", json=more, headers=tenant)
    await dispatcher(app).tick()
    after = Counter(str(job.server_id) for job in published_jobs(app))
    assert bad not in after
    assert sum(after.values()) == 30

    resumed = await app.client.post(f"/v1/servers/{bad}/resume", headers=tenant)
    assert (resumed.json()["status"], resumed.json()["status_reason"]) == ("active", None)


async def test_the_server_s_view_shows_the_rates_the_mailbox_reader_counted(
    app: Api, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    """The scheduler counts, the registry shows: after each read of a mailbox its server's
    `reputation` on GET /v1/servers/{id} is the one GET /v1/servers/{id}/warmup shows, through
    the one-process reader and through the stack's (HTTP to the registry's internal route)."""
    tenant = await app.new_tenant()
    accounts = await add_servers_with_mailboxes(app, tenant, starttls_server, dovecot)
    await warm_up(app, list(accounts))
    run = uuid.uuid4().hex[:6]
    leads = [f"r{i}.{run}@example.org" for i in range(12)]
    ids, jobs = await send(app, tenant, leads)
    server_id = str(jobs[ids[0]].server_id)
    mine = [i for i, email_id in enumerate(ids) if str(jobs[email_id].server_id) == server_id]
    assert len(mine) == 4  # 12 through three servers: under ABL_BOUNCE_MIN_SENT, not judged

    async def registry_view(server: str) -> Any:
        got = await app.client.get(f"/v1/servers/{server}", headers=tenant)
        return got.json()["reputation"]

    async def warmup_view(server: str) -> dict[str, Any]:
        got = await app.client.get(f"/v1/servers/{server}/warmup", headers=tenant)
        value: dict[str, Any] = got.json()["reputation"]
        return {k: value[k] for k in ("sample", "bounce_rate", "complaint_rate")}

    assert [await registry_view(s) for s in accounts] == [None, None, None]  # no read yet
    first = mine[0]
    dovecot.append(accounts[server_id], mail.dsn(leads[first], mail.our_message_id(ids[first])))
    started = utcnow()
    await reader(app).poll_all()  # the one-process shape: the registry's use case
    shown = await registry_view(server_id)
    assert {k: v for k, v in shown.items() if k != "at"} == await warmup_view(server_id)
    assert (shown["sample"], shown["bounce_rate"], shown["complaint_rate"]) == (4, 0.25, 0.0)
    assert datetime.fromisoformat(shown["at"]) >= started
    for other in set(accounts) - {server_id}:
        clean = await registry_view(other)
        assert (clean["sample"], clean["bounce_rate"]) == (4, 0.0)

    second = mine[1]
    dovecot.append(accounts[server_id], mail.arf(leads[second], mail.our_message_id(ids[second])))
    source = HttpMailboxSource(
        app.client, app.settings.internal_token.get_secret_value(), app.app.state.sessions
    )
    stack_reader = MailboxReader(app.settings, app.app.state.sessions, source, allow_private=True)
    try:
        await stack_reader.poll_all()  # the stack's shape: POST .../mailbox-poll
    finally:
        stack_reader.close()
    shown = await registry_view(server_id)
    assert {k: v for k, v in shown.items() if k != "at"} == await warmup_view(server_id)
    assert (shown["sample"], shown["bounce_rate"], shown["complaint_rate"]) == (4, 0.25, 0.25)
