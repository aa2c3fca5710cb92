"""The bounce-rate guard: the rule as a table, then a server crossing the threshold on bounces
read from a real Dovecot is paused and its next emails go to the tenant's other servers."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from services.scheduler.domain import BounceGuard, bounce_verdict
from shared.messages import Outcome
from shared.settings import Settings
from tests.conftest import Api, make_settings, running
from tests.support import mailbox_messages as mail
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpTestServer
from tests.test_mailbox_reader import add_servers_with_mailboxes, reader
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
    await warm_up(app, list(accounts))
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
