"""The mailbox reader against a real Dovecot: a campaign through three servers whose recipients
bounce (standard and non-standard DSNs placed in the sending mailboxes), reply and auto-reply;
suppressions and sequences follow; nothing in the mailboxes is changed; re-reads (and a
UIDVALIDITY change) count nothing twice; a mailbox that hangs or refuses the login delays no
other."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlmodel import select

from services.registry.models import RegistryOutbox
from services.scheduler.inbox import MailboxReader, MailboxRef
from services.scheduler.models import MailboxCursor, MailboxEvent
from shared.imap import ImapEndpoint, ImapSecurity
from shared.messages import Outcome, PollReputation
from shared.settings import Settings
from tests.conftest import ACCOUNTS, Api, make_settings, running, truncate_postgres
from tests.support import mailbox_messages as mail
from tests.support.dovecot import DovecotServer
from tests.support.smtp import Certificates, SmtpTestServer, silent_server
from tests.test_scheduler_api import add_servers, dispatcher, published_jobs, result_for, warm_up


@pytest.fixture
def settings(database_url: str) -> Settings:
    # Every mailbox due again right after a read: the tests read them round after round.
    return make_settings(
        database_url,
        inbox_timeout_seconds=3.0,
        inbox_poll_seconds=0.001,
        verify_timeout_seconds=20.0,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings, combined=True) as api:
        yield api


def reader(api: Api) -> MailboxReader:
    value: MailboxReader = api.app.state.mailbox_reader
    return value


def bounces(kind: str) -> float:
    return REGISTRY.get_sample_value("abl_bounces_total", {"kind": kind}) or 0.0


async def add_servers_with_mailboxes(
    api: Api, tenant: dict[str, str], smtp: SmtpTestServer, dovecot: DovecotServer
) -> dict[str, str]:
    """server id → the account (and mailbox) it sends from."""
    imap = {"host": "localhost", "port": dovecot.tls_port}
    ids = await add_servers(api, tenant, smtp, imap=imap)
    return dict(zip(ids, ACCOUNTS, strict=True))


async def statuses(api: Api, tenant: dict[str, str], ids: list[str]) -> list[str]:
    return [
        (await api.client.get(f"/v1/messages/{i}", headers=tenant)).json()["status"] for i in ids
    ]


async def test_a_campaign_through_three_servers_reads_back_bounces_and_replies(
    app: Api, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    tenant = await app.new_tenant()
    accounts = await add_servers_with_mailboxes(app, tenant, starttls_server, dovecot)
    await warm_up(app, list(accounts))
    run = uuid.uuid4().hex[:6]
    leads = [f"lead{i}.{run}@example.org" for i in range(9)]
    first = await app.client.post(
        "/v1/messages",
        json={
            "messages": [
                {"to": lead, "subject": "Hi", "text": "x", "sequence": "intro", "campaign": "c1"}
                for lead in leads
            ]
        },
        headers=tenant,
    )
    ids = first.json()["ids"]
    await dispatcher(app).tick()
    jobs = {str(job.email_id): job for job in published_jobs(app)}
    assert len({job.server_id for job in jobs.values()}) == 3  # through all three servers
    for job in jobs.values():
        assert await app.app.state.result_applier.apply(
            result_for(job, Outcome.sent, data_completed=True)
        )
    # The follow-ups of the sequence wait in the queue (no tick runs).
    follow = await app.client.post(
        "/v1/messages",
        json={
            "messages": [
                {"to": lead, "subject": "Again", "text": "x", "sequence": "intro"} for lead in leads
            ]
        },
        headers=tenant,
    )
    follow_ids = follow.json()["ids"]

    def mailbox_of(index: int) -> str:
        return accounts[str(jobs[ids[index]].server_id)]

    def our_id(index: int) -> str:
        return mail.our_message_id(ids[index], "example.com")

    dovecot.append(mailbox_of(0), mail.dsn(leads[0], our_id(0)))  # hard, RFC 3464
    dovecot.append(mailbox_of(1), mail.qmail_bounce(leads[1]))  # hard, non-standard
    for _ in range(3):  # soft, three times: suppressed, the email stays sent
        dovecot.append(
            mailbox_of(2), mail.dsn(leads[2], our_id(2), status="4.2.2", action="delayed")
        )
    dovecot.append(mailbox_of(3), mail.reply(leads[3], our_id(3)))
    dovecot.append(mailbox_of(4), mail.reply(leads[4], our_id(4), auto=True))
    dovecot.append(mailbox_of(5), b"From: news@x.org\r\nSubject: Weekly\r\n\r\nNews\r\n")
    flags_before = {login: dovecot.flags(login) for login in ACCOUNTS}
    hard_before = bounces("hard")

    errors = await reader(app).poll_all()
    assert errors == dict.fromkeys(map(uuid.UUID, accounts))
    assert await statuses(app, tenant, ids) == [
        "bounced",
        "bounced",
        "sent",
        "replied",
        "sent",
        "sent",
        "sent",
        "sent",
        "sent",
    ]
    bounced = (await app.client.get(f"/v1/messages/{ids[0]}", headers=tenant)).json()
    assert bounced["bounce_status"] == "5.1.1"
    assert "User unknown" in bounced["bounce_diagnostic"]
    assert bounces("hard") - hard_before == 2
    listed = (await app.client.get("/v1/suppressions", headers=tenant)).json()["items"]
    assert {(e["address"], e["source"]) for e in listed} == {
        (leads[0], "bounce"),
        (leads[1], "bounce"),
        (leads[2], "bounce"),
    }
    # The sequence stops for the bounced and the replier; the auto-replier's goes on.
    assert await statuses(app, tenant, follow_ids) == [
        "canceled",
        "canceled",
        "canceled",
        "canceled",
        "queued",
        "queued",
        "queued",
        "queued",
        "queued",
    ]
    # Suppressed addresses are refused on the next campaign.
    again = await app.client.post(
        "/v1/messages",
        json={"messages": [{"to": lead, "subject": "Hi", "text": "x"} for lead in leads[:4]]},
        headers=tenant,
    )
    assert [item["status"] for item in again.json()["items"]] == [
        "suppressed",
        "suppressed",
        "suppressed",
        "queued",
    ]
    # Nothing in the mailboxes was marked read, moved or deleted.
    assert {login: dovecot.flags(login) for login in ACCOUNTS} == flags_before
    server = (await app.client.get(f"/v1/servers/{next(iter(accounts))}", headers=tenant)).json()
    assert server["imap"]["last_poll_at"] is not None
    assert server["imap"]["last_poll_error"] is None

    # Read again, and again after the mailbox is re-created (a new UIDVALIDITY) with the same
    # notifications in it: nothing counts twice.
    async with app.app.state.sessions() as session:
        events = len((await session.exec(select(MailboxEvent))).all())
        cursor = await session.get(MailboxCursor, jobs[ids[0]].server_id)
        assert cursor is not None
        validity = cursor.uidvalidity
    await reader(app).poll_all()
    login = mailbox_of(0)
    dovecot.recreate_inbox(login)
    await asyncio.sleep(1.1)  # UIDVALIDITY is a time stamp in seconds in Dovecot
    dovecot.append(login, mail.dsn(leads[0], our_id(0)))
    assert await reader(app).poll_all() == dict.fromkeys(map(uuid.UUID, accounts))
    async with app.app.state.sessions() as session:
        assert len((await session.exec(select(MailboxEvent))).all()) == events + 1
        cursor = await session.get(MailboxCursor, jobs[ids[0]].server_id)
        assert cursor is not None
        assert cursor.uidvalidity != validity
    # The re-appended DSN has a new Message-ID of its own: one more event, but the email and
    # the suppression list are as they were.
    assert bounces("hard") - hard_before == 3
    assert len((await app.client.get("/v1/suppressions", headers=tenant)).json()["items"]) == 3


async def test_the_same_notification_read_twice_counts_once(
    app: Api, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    tenant = await app.new_tenant()
    accounts = await add_servers_with_mailboxes(app, tenant, starttls_server, dovecot)
    login = next(iter(accounts.values()))
    raw = mail.dsn("someone@example.org", "<abl." + "0" * 32 + "@example.com>")
    dovecot.append(login, raw)
    dovecot.append(login, raw)  # delivered twice, as a retried DSN can be
    await reader(app).poll_all()
    dovecot.recreate_inbox(login)
    await asyncio.sleep(1.1)
    dovecot.append(login, raw)
    await reader(app).poll_all()
    async with app.app.state.sessions() as session:
        rows = (
            await session.exec(select(MailboxEvent).where(MailboxEvent.key.startswith("id:<dsn")))
        ).all()
        key = mail_key(raw)
        assert [row.key for row in rows if row.key == key] == [key]


def mail_key(raw: bytes) -> str:
    from services.scheduler.feedback import classify

    return classify(raw).key


async def refusing_imap(certs: Certificates) -> asyncio.Server:
    """An IMAPS server that refuses every login at once. (Not Dovecot: after a refused login
    Dovecot delays every login from the same address for a while, the good one's too.)"""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        while line := await reader.readline():
            tag, _, command = line.decode().partition(" ")
            if command.upper().startswith("CAPABILITY"):
                writer.write(f"* CAPABILITY IMAP4rev1\r\n{tag} OK done\r\n".encode())
            elif command.upper().startswith("LOGOUT"):
                writer.write(f"* BYE\r\n{tag} OK bye\r\n".encode())
                break
            else:
                writer.write(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n".encode())
            await writer.drain()
        writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0, ssl=certs.server_context())


class StaticMailboxes:
    """A `MailboxSource` of fixed endpoints (mailboxes of no registered server), which keeps
    what the reader reports."""

    def __init__(self, tenant_id: uuid.UUID, boxes: dict[uuid.UUID, ImapEndpoint]) -> None:
        self.tenant_id = tenant_id
        self.boxes = boxes
        self.reports: dict[uuid.UUID, tuple[datetime, str | None]] = {}

    async def mailboxes(self) -> list[MailboxRef]:
        return [MailboxRef(server_id, self.tenant_id) for server_id in self.boxes]

    async def endpoint(
        self, server_id: uuid.UUID, rejected: str | None = None
    ) -> ImapEndpoint | None:
        return self.boxes.get(server_id)

    async def report(
        self,
        server_id: uuid.UUID,
        at: datetime,
        error: str | None,
        reputation: PollReputation | None = None,
    ) -> None:
        self.reports[server_id] = (at, error)

    async def pause(self, server_id: uuid.UUID, reason: str) -> None:
        raise AssertionError("no server of this test is judged")


async def test_a_mailbox_that_hangs_or_refuses_delays_no_other(
    app: Api, dovecot: DovecotServer, certs: Certificates
) -> None:
    tenant_id = uuid.uuid4()
    good = ImapEndpoint("localhost", dovecot.tls_port, ImapSecurity.tls, "carol@example.com", "")
    good = ImapEndpoint(good.host, good.port, good.security, good.username, ACCOUNTS[good.username])
    refuser = await refusing_imap(certs)
    refused_port = refuser.sockets[0].getsockname()[1]
    refused = ImapEndpoint("localhost", refused_port, ImapSecurity.tls, "bob@example.com", "no")
    dovecot.append("carol@example.com", mail.reply("x@example.org", "<abl." + "1" * 32 + "@e.com>"))
    with silent_server() as port:
        hanging = ImapEndpoint("localhost", port, ImapSecurity.tls, "a", "b")
        boxes = {uuid.uuid4(): e for e in (hanging, refused, good)}
        source = StaticMailboxes(tenant_id, boxes)
        settings: Any = app.settings
        subject = MailboxReader(settings, app.app.state.sessions, source, allow_private=True)
        try:
            started = time.monotonic()
            results = await subject.poll_all()
            took = time.monotonic() - started
        finally:
            subject.close()
            refuser.close()
    hang_id, refused_id, good_id = boxes
    assert results[good_id] is None
    hang_error, refused_error = results[hang_id], results[refused_id]
    assert hang_error is not None
    assert hang_error.startswith("timeout")
    assert refused_error is not None
    assert "refused" in refused_error
    # The hanging one was given up on at its bound; the good one finished long before it.
    assert took < app.settings.inbox_timeout_seconds + 2
    reports = source.reports
    first = min(at for at, _ in reports.values())
    assert (reports[good_id][0] - first).total_seconds() < 0.1 or reports[good_id][0] < reports[
        hang_id
    ][0]
    assert (reports[hang_id][0] - reports[good_id][0]).total_seconds() > 1.5


def messages_in(dovecot: DovecotServer, login: str) -> int:
    client = dovecot.client(login)
    try:
        _, data = client.select("INBOX", readonly=True)
        return int(data[0] or 0)
    finally:
        client.logout()


@pytest.mark.postgres
async def test_two_replicas_split_the_mailboxes_and_read_each_message_once(
    migrated_postgres: str, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    """Two scheduler replicas on one PostgreSQL read at the same moment: each mailbox is read
    by one of them, each message fetched and classified once; neither reads a mailbox again
    before its next read is due."""
    await truncate_postgres(migrated_postgres)
    settings = make_settings(migrated_postgres, inbox_timeout_seconds=5.0)
    async with running(settings, combined=True) as one, running(settings, combined=True) as two:
        tenant = await one.new_tenant()
        accounts = await add_servers_with_mailboxes(one, tenant, starttls_server, dovecot)
        for login in accounts.values():
            for _ in range(5):
                dovecot.append(
                    login, mail.reply("x@example.org", mail.our_message_id(uuid.uuid4()))
                )
        expected = sum(messages_in(dovecot, login) for login in accounts.values())
        before = read_messages()

        first, second = await asyncio.gather(reader(one).poll_all(), reader(two).poll_all())

        assert set(first).isdisjoint(second)
        assert set(first) | set(second) == set(map(uuid.UUID, accounts))
        assert all(error is None for error in [*first.values(), *second.values()])
        assert read_messages() - before == expected
        # Not due again until a poll interval has passed: the next round reads nothing.
        again = await asyncio.gather(reader(one).poll_all(), reader(two).poll_all())
        assert not again[0]
        assert not again[1]
        assert read_messages() - before == expected


def read_messages() -> float:
    return REGISTRY.get_sample_value("abl_mailbox_messages_total") or 0.0


async def test_the_registry_s_internal_routes_for_the_reader(
    app: Api, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    """What the scheduler's reader uses in the stack: a mailbox's access (internal token only,
    not cached), the report of a read, and a bounce pause that happens once."""
    tenant = await app.new_tenant()
    accounts = await add_servers_with_mailboxes(app, tenant, starttls_server, dovecot)
    server_id, login = next(iter(accounts.items()))
    path = f"/internal/v1/servers/{server_id}"
    refused = await app.client.get(f"{path}/imap-credentials", headers=tenant)
    assert refused.status_code == 401
    access = await app.client.get(f"{path}/imap-credentials", headers=app.internal())
    assert access.status_code == 200
    assert access.headers["cache-control"] == "no-store"
    assert (access.json()["username"], access.json()["password"]) == (login, ACCOUNTS[login])
    assert access.json()["port"] == dovecot.tls_port
    missing = await app.client.get(
        f"/internal/v1/servers/{uuid.uuid4()}/imap-credentials", headers=app.internal()
    )
    assert (missing.status_code, missing.json()["code"]) == (404, "mailbox_not_found")

    polled = await app.client.post(
        f"{path}/mailbox-poll",
        json={"polled_at": "2026-11-27T10:00:00Z", "error": "timeout: no answer"},
        headers=app.internal(),
    )
    assert polled.status_code == 204
    view = (await app.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()
    assert view["imap"]["last_poll_at"].startswith("2026-11-27T10:00:00")
    assert view["imap"]["last_poll_error"] == "timeout: no answer"
    assert "password" not in view["imap"]
    assert view["reputation"] is None  # that report had no rates

    # A report with the scheduler's rates, then one of an older reader (no `reputation`): it
    # is taken, and the rates stay as the last report that had them.
    rates = {"sample": 40, "bounce_rate": 0.025, "complaint_rate": 0.0}
    polled = await app.client.post(
        f"{path}/mailbox-poll",
        json={"polled_at": "2026-11-27T10:01:00Z", "reputation": rates},
        headers=app.internal(),
    )
    assert polled.status_code == 204, polled.text
    old_shape = await app.client.post(
        f"{path}/mailbox-poll",
        json={"polled_at": "2026-11-27T10:02:00Z", "error": None},
        headers=app.internal(),
    )
    assert old_shape.status_code == 204, old_shape.text
    view = (await app.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()
    assert view["imap"]["last_poll_at"].startswith("2026-11-27T10:02:00")
    assert view["imap"]["last_poll_error"] is None
    assert view["reputation"]["at"].startswith("2026-11-27T10:01:00")
    assert {k: v for k, v in view["reputation"].items() if k != "at"} == rates
    refused_rate = await app.client.post(
        f"{path}/mailbox-poll",
        json={"polled_at": "2026-11-27T10:03:00Z", "reputation": rates | {"bounce_rate": 2}},
        headers=app.internal(),
    )
    assert refused_rate.status_code == 422

    for _ in range(2):  # a second replica's pause changes nothing more
        paused = await app.client.post(
            f"{path}/bounce-pause", json={"reason": "hard bounces"}, headers=app.internal()
        )
        assert paused.json()["status"] == "paused_bounces"
    async with app.app.state.sessions() as session:
        outbox = (await session.exec(select(RegistryOutbox))).all()
    changes = [row for row in outbox if b"paused_bounces" in row.body]
    assert len(changes) == 1


async def test_idle_reads_a_new_message_long_before_the_next_poll(
    database_url: str, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    """Dovecot advertises IDLE: after its first read the reader keeps each mailbox in IDLE and
    reads a message that arrives at once, where polling would wait two minutes."""
    poll = 120.0
    settings = make_settings(database_url, inbox_poll_seconds=poll, inbox_timeout_seconds=5.0)
    async with running(settings, combined=True) as app:
        tenant = await app.new_tenant()
        accounts = await add_servers_with_mailboxes(app, tenant, starttls_server, dovecot)
        subject = reader(app)
        stop = asyncio.Event()
        loop = asyncio.create_task(subject.run(stop))
        try:
            for _ in range(200):  # the first round reads every mailbox and starts watching
                if len(subject.watching) == len(accounts):
                    break
                await asyncio.sleep(0.05)
            assert set(subject.watching) == set(map(uuid.UUID, accounts))
            await asyncio.sleep(1.0)  # the watchers' IDLE commands are under way
            raw = mail.reply("x@example.org", mail.our_message_id(uuid.uuid4()))
            key = mail_key(raw)
            started = time.monotonic()
            dovecot.append(next(iter(accounts.values())), raw)
            found = None
            while found is None and time.monotonic() - started < poll / 2:
                async with app.app.state.sessions() as session:
                    query = select(MailboxEvent).where(MailboxEvent.key == key)
                    found = (await session.exec(query)).first()
                await asyncio.sleep(0.1)
            assert found is not None, "not read before half the poll interval"
            assert found.kind == "reply"
        finally:
            stop.set()
            await asyncio.wait_for(loop, timeout=10)
