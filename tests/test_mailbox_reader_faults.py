"""Faults of the mailbox reader against a real Dovecot (and PostgreSQL, whose column limits
SQLite does not enforce): a message the database refuses is skipped and the mailbox goes on."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlmodel import col, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.scheduler.feedback import Feedback, Kind
from services.scheduler.inbox import AccessUnavailable, Mailbox, MailboxRef, MailboxSource
from services.scheduler.mailbox_source import HttpMailboxSource
from services.scheduler.models import MailboxCursor, MailboxEvent
from services.sender.clients import DependencyUnavailable, HttpRegistry
from shared.broker import Delivery
from shared.imap import ImapEndpoint, ImapSecurity
from shared.messages import CancelNotice, Outcome, PollReputation
from shared.settings import Settings
from tests.conftest import ACCOUNTS, Api, make_settings, running, truncate_postgres
from tests.support import mailbox_messages as mail
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpTestServer
from tests.test_mailbox_reader import (
    StaticMailboxes,
    add_servers_with_mailboxes,
    mail_key,
    messages_in,
    reader,
    statuses,
)
from tests.test_scheduler_api import dispatcher, published_jobs, result_for, warm_up


def polling(database_url: str, **extra: Any) -> Settings:
    """Every mailbox due again right after a read: the tests read them round after round."""
    return make_settings(database_url, inbox_timeout_seconds=5.0, inbox_poll_seconds=0.001, **extra)


async def warm_servers(
    app: Api, smtp: SmtpTestServer, dovecot: DovecotServer
) -> tuple[dict[str, str], dict[str, str]]:
    """A new tenant's three warm servers with mailboxes: (its headers, server id → login)."""
    tenant = await app.new_tenant()
    accounts = await add_servers_with_mailboxes(app, tenant, smtp, dovecot)
    await warm_up(app, list(accounts))
    return tenant, accounts


async def send(
    app: Api, tenant: dict[str, str], leads: list[str], applied: bool = True, **extra: Any
) -> tuple[list[str], dict[str, Any]]:
    """Emails to `leads` dispatched (and their `sent` results applied): (ids, job by id)."""
    posted = await app.client.post(
        "/v1/messages",
        json={"messages": [{"to": lead, "subject": "Hi", "text": "x", **extra} for lead in leads]},
        headers=tenant,
    )
    ids: list[str] = posted.json()["ids"]
    await dispatcher(app).tick()
    jobs = {str(job.email_id): job for job in published_jobs(app) if str(job.email_id) in ids}
    if applied:
        for job in jobs.values():
            assert await app.app.state.result_applier.apply(
                result_for(job, Outcome.sent, data_completed=True)
            )
    return ids, jobs


async def test_a_status_with_a_comment_and_a_long_address_do_not_stop_the_mailbox(
    database_url: str, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    """`Status: 5.1.1 (user unknown)` is longer than the status columns: read as 5.1.1, and
    the reply after it is read too, the cursor past both."""
    async with running(polling(database_url), combined=True) as app:
        tenant, accounts = await warm_servers(app, starttls_server, dovecot)
        run = uuid.uuid4().hex[:6]
        leads = [f"a{run}@example.org", f"b{run}@example.org"]
        ids, jobs = await send(app, tenant, leads)
        server_of = {i: jobs[i].server_id for i in ids}
        login = accounts[str(server_of[ids[0]])]
        long_address = "x" * 330 + "@example.org"
        raws = [
            mail.dsn(leads[0], mail.our_message_id(ids[0]), status="5.1.1 (user unknown)"),
            mail.dsn(long_address, "<other@example.net>", status="5.1.1 <" + "y" * 40 + ">"),
            mail.reply(leads[1], mail.our_message_id(ids[1])),
        ]
        for raw in raws:
            dovecot.append(login, raw)
        keys = [mail_key(raw) for raw in raws]
        read = await reader(app).poll_all()
        assert read[server_of[ids[0]]] is None
        assert await statuses(app, tenant, ids[:1]) == ["bounced"]
        got = (await app.client.get(f"/v1/messages/{ids[0]}", headers=tenant)).json()
        assert got["bounce_status"] == "5.1.1"
        async with app.app.state.sessions() as session:
            events = (
                await session.exec(select(MailboxEvent).where(col(MailboxEvent.key).in_(keys)))
            ).all()
            cursor = await session.get(MailboxCursor, server_of[ids[0]])
        assert sorted(e.status or "" for e in events if e.kind == "hard_bounce") == [
            "5.1.1",
            "5.1.1",
        ]
        assert all(e.address is None or len(e.address) <= 320 for e in events)
        assert sorted(e.kind for e in events) == ["hard_bounce", "hard_bounce", "reply"]
        assert await statuses(app, tenant, ids[1:]) == ["replied"]
        assert cursor is not None
        assert cursor.last_uid == messages_in(dovecot, login)


@pytest.mark.postgres
async def test_a_message_the_database_refuses_is_skipped_and_the_next_applied(
    migrated_postgres: str,
) -> None:
    """Whatever slips past the normalisation: the message's savepoint is rolled back, the one
    after it is applied in the same transaction, and the refusal is logged without content."""
    await truncate_postgres(migrated_postgres)
    settings = make_settings(migrated_postgres)
    async with running(settings, combined=True) as app:
        tenant_id = uuid.uuid4()
        box = Mailbox(uuid.uuid4(), tenant_id, ImapEndpoint("h", 993, ImapSecurity.tls, "u", "p"))
        bad = Feedback(Kind.hard_bounce, "id:<bad@x>", recipients=("a@x.org",), status="9" * 40)
        good = Feedback(Kind.hard_bounce, "id:<good@x>", recipients=("b@x.org",), status="5.1.1")
        before = REGISTRY.get_sample_value("abl_mailbox_messages_unapplied_total") or 0.0
        async with app.app.state.sessions() as session, session.begin():
            assert await reader(app)._apply_one(session, box, 1, bad, []) == 0
            assert await reader(app)._apply_one(session, box, 2, good, []) == 1
        async with app.app.state.sessions() as session:
            keys = (await session.exec(select(MailboxEvent.key))).all()
        assert keys == ["id:<good@x>"]
        after = REGISTRY.get_sample_value("abl_mailbox_messages_unapplied_total") or 0.0
        assert after - before == 1


async def test_a_bounce_read_before_the_send_result_is_applied_after_it(
    database_url: str, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    """The bounce (and the reply behind it) arrive while the email is still `scheduled`: they
    are not recorded then, and once the `sent` result is applied the next read bounces it."""
    async with running(polling(database_url), combined=True) as app:
        tenant, accounts = await warm_servers(app, starttls_server, dovecot)
        run = uuid.uuid4().hex[:6]
        leads = [f"c{run}@example.org", f"d{run}@example.org"]
        sent, _ = await send(app, tenant, leads[1:])
        ids, jobs = await send(app, tenant, leads[:1], applied=False)
        server_id = jobs[ids[0]].server_id
        login = accounts[str(server_id)]
        raws = [
            mail.dsn(leads[0], mail.our_message_id(ids[0])),
            mail.reply(leads[1], mail.our_message_id(sent[0])),
        ]
        for raw in raws:
            dovecot.append(login, raw)
        keys = [mail_key(raw) for raw in raws]
        assert (await reader(app).poll_all())[server_id] is None
        assert await statuses(app, tenant, [ids[0], sent[0]]) == ["scheduled", "sent"]
        async with app.app.state.sessions() as session:
            query = select(MailboxEvent).where(col(MailboxEvent.key).in_(keys))
            assert (await session.exec(query)).all() == []

        assert await app.app.state.result_applier.apply(
            result_for(jobs[ids[0]], Outcome.sent, data_completed=True)
        )
        assert (await reader(app).poll_all())[server_id] is None
        assert await statuses(app, tenant, [ids[0], sent[0]]) == ["bounced", "replied"]
        async with app.app.state.sessions() as session:
            assert len((await session.exec(query)).all()) == 2
            cursor = await session.get(MailboxCursor, server_id)
        assert cursor is not None
        assert cursor.last_uid == messages_in(dovecot, login)


class PauseFailsOnce:
    """The reader's own source, whose first pause finds the registry unreachable."""

    def __init__(self, source: MailboxSource) -> None:
        self.source = source
        self.calls = 0

    async def mailboxes(self) -> Sequence[MailboxRef]:
        return await self.source.mailboxes()

    async def endpoint(
        self, server_id: uuid.UUID, rejected: str | None = None
    ) -> ImapEndpoint | None:
        return await self.source.endpoint(server_id, rejected)

    async def report(
        self,
        server_id: uuid.UUID,
        at: datetime,
        error: str | None,
        reputation: PollReputation | None = None,
    ) -> None:
        await self.source.report(server_id, at, error, reputation)

    async def pause(self, server_id: uuid.UUID, reason: str) -> None:
        self.calls += 1
        if self.calls == 1:
            raise httpx.ConnectError("registry unreachable")
        await self.source.pause(server_id, reason)


async def test_a_pause_the_registry_did_not_take_is_tried_again_next_round(
    database_url: str, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    async with running(polling(database_url, bounce_min_sent=1), combined=True) as app:
        tenant, accounts = await warm_servers(app, starttls_server, dovecot)
        lead = f"p{uuid.uuid4().hex[:6]}@example.org"
        ids, jobs = await send(app, tenant, [lead])
        server_id = jobs[ids[0]].server_id
        dovecot.append(accounts[str(server_id)], mail.dsn(lead, mail.our_message_id(ids[0])))
        source = PauseFailsOnce(reader(app).source)
        reader(app).source = source

        async def status() -> str:
            got = await app.client.get(f"/v1/servers/{server_id}", headers=tenant)
            value: str = got.json()["status"]
            return value

        await reader(app).poll_all()
        assert source.calls == 1
        assert await status() == "active"
        await reader(app).poll_all()  # nothing new in the mailbox: the pause is tried again
        assert source.calls == 2
        assert await status() == "paused_bounces"
        await reader(app).poll_all()
        assert source.calls == 2


class PauseRefused(PauseFailsOnce):
    """The reader's own source, whose every pause finds the registry unreachable."""

    async def pause(self, server_id: uuid.UUID, reason: str) -> None:
        self.calls += 1
        raise httpx.ConnectError("registry unreachable")


async def test_a_pause_the_registry_did_not_take_survives_a_restart(
    database_url: str, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    """The guard decides a pause the registry does not take, and the scheduler stops: the
    pause is in the database, so the next process (or another replica) asks for it on its
    first round, though the mailbox brings nothing new to judge again."""
    settings = polling(database_url, bounce_min_sent=1)
    async with running(settings, combined=True) as app:
        tenant, accounts = await warm_servers(app, starttls_server, dovecot)
        lead = f"r{uuid.uuid4().hex[:6]}@example.org"
        ids, jobs = await send(app, tenant, [lead])
        server_id = jobs[ids[0]].server_id
        dovecot.append(accounts[str(server_id)], mail.dsn(lead, mail.our_message_id(ids[0])))
        refusing = PauseRefused(reader(app).source)
        reader(app).source = refusing
        await reader(app).poll_all()
        assert refusing.calls == 1
        view = (await app.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()
        assert view["status"] == "active"
        pending = await reader(app).pending_pauses()
        assert list(pending) == [server_id]
        assert pending[server_id].startswith("hard bounces 1 of the last 1 sent")

    async with running(settings, combined=True) as restarted:  # a new process: nothing in memory
        subject = reader(restarted)
        await subject.poll_all()
        view = (await restarted.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()
        assert view["status"] == "paused_bounces"
        assert view["status_reason"].startswith("hard bounces 1 of the last 1 sent")
        # Taken: cleared, and asked for no more.
        assert await subject.pending_pauses() == {}
        async with restarted.app.state.sessions() as session:
            cursor = await session.get(MailboxCursor, server_id)
        assert cursor is not None
        assert (cursor.pending_pause, cursor.pending_pause_at) == (None, None)


async def test_a_reply_cancels_the_follow_up_whose_job_is_out_and_tells_the_senders(
    database_url: str, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    """The follow-up is `scheduled` (its job published) when the reply is read: it ends
    `canceled`, and the senders hear its cancel after the commit, as from the cancel route."""
    async with running(polling(database_url), combined=True) as app:
        heard: list[CancelNotice] = []

        async def on_cancel(delivery: Delivery) -> None:
            heard.append(CancelNotice.model_validate_json(delivery.body))

        await app.app.state.bus.subscribe(app.settings.cancels_topic, on_cancel)
        tenant, accounts = await warm_servers(app, starttls_server, dovecot)
        lead = f"s{uuid.uuid4().hex[:6]}@example.org"
        first, jobs = await send(app, tenant, [lead], sequence="intro")
        follow, follow_jobs = await send(app, tenant, [lead], applied=False, sequence="intro")
        assert await statuses(app, tenant, follow) == ["scheduled"]
        login = accounts[str(jobs[first[0]].server_id)]
        dovecot.append(login, mail.reply(lead, mail.our_message_id(first[0])))
        await reader(app).poll_all()
        assert await statuses(app, tenant, [*first, *follow]) == ["replied", "canceled"]
        for _ in range(50):
            if heard:
                break
            await asyncio.sleep(0.01)
        job = follow_jobs[follow[0]]
        assert heard == [CancelNotice(email_id=job.email_id, job_id=job.job_id)]


async def test_the_idle_connection_of_a_deleted_server_is_closed(
    database_url: str, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    """A server deleted while its mailbox sits in IDLE: after the next round its watcher is
    stopped and dropped, and Dovecot has no session of that account any more; the others
    stay."""
    settings = make_settings(database_url, inbox_poll_seconds=0.3, inbox_timeout_seconds=5.0)
    async with running(settings, combined=True) as app:
        tenant = await app.new_tenant()
        accounts = await add_servers_with_mailboxes(app, tenant, starttls_server, dovecot)
        subject = reader(app)
        stop = asyncio.Event()
        loop = asyncio.create_task(subject.run(stop))
        try:
            gone, login = next(iter(accounts.items()))
            for _ in range(200):
                if len(subject.watching) == len(accounts) and login in dovecot.logged_in():
                    break
                await asyncio.sleep(0.05)
            assert set(subject.watching) == set(map(uuid.UUID, accounts))
            watcher = subject.watching[uuid.UUID(gone)]
            deleted = await app.client.delete(f"/v1/servers/{gone}", headers=tenant)
            assert deleted.status_code == 204
            for _ in range(200):
                if watcher.future.done() and login not in dovecot.logged_in():
                    break
                await asyncio.sleep(0.05)
            assert watcher.future.done()
            assert login not in dovecot.logged_in()
            assert set(subject.watching) == set(map(uuid.UUID, accounts)) - {uuid.UUID(gone)}
            assert uuid.UUID(gone) not in subject.targets
            assert not any(w.future.done() for w in subject.watching.values())
            assert set(dovecot.logged_in()) >= set(accounts.values()) - {login}
        finally:
            stop.set()
            await asyncio.wait_for(loop, timeout=10)


async def test_an_idle_connection_logs_in_again_when_the_mailbox_access_changes(
    database_url: str, dovecot: DovecotServer
) -> None:
    """The mailbox's access changes (here to another account) while it sits in IDLE: the
    connection with the old access is closed, one with the new access opened."""
    settings = make_settings(database_url, inbox_poll_seconds=0.3, inbox_timeout_seconds=5.0)
    old, new = list(ACCOUNTS)[:2]
    server_id = uuid.uuid4()

    def access(login: str) -> ImapEndpoint:
        return ImapEndpoint("localhost", dovecot.tls_port, ImapSecurity.tls, login, ACCOUNTS[login])

    async with running(settings, combined=True) as app:
        source = StaticMailboxes(uuid.uuid4(), {server_id: access(old)})
        subject = reader(app)
        subject.source = source
        stop = asyncio.Event()
        loop = asyncio.create_task(subject.run(stop))
        try:
            for _ in range(200):
                if server_id in subject.watching and old in dovecot.logged_in():
                    break
                await asyncio.sleep(0.05)
            first = subject.watching[server_id]
            assert old in dovecot.logged_in()
            source.boxes[server_id] = access(new)
            for _ in range(200):
                who = dovecot.logged_in()
                if first.future.done() and old not in who and new in who:
                    break
                await asyncio.sleep(0.05)
            assert first.future.done()
            assert old not in dovecot.logged_in()
            assert new in dovecot.logged_in()
            assert subject.watching[server_id] is not first
        finally:
            stop.set()
            await asyncio.wait_for(loop, timeout=10)


CANARY = "k-" + uuid.uuid4().hex[:8]


def disagreeing_registry() -> httpx.AsyncClient:
    """A registry of another version: its credentials answers lack fields (and carry a
    secret)."""

    async def credentials(request: Request) -> JSONResponse:
        # Short: pydantic elides the middle of a long input in its error text.
        return JSONResponse({"host": "m.example.org", "password": CANARY})

    app = Starlette(routes=[Route("/{path:path}", credentials, methods=["GET", "POST"])])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://registry")


async def test_an_answer_of_another_registry_version_puts_no_secret_in_the_logs(
    database_url: str,
    starttls_server: SmtpTestServer,
    dovecot: DovecotServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mailbox reader and the sender's registry client: the answer does not validate,
    the mailbox waits (the job would too), and the secret it held is in no log record."""
    caplog.set_level(logging.DEBUG)
    async with (
        running(polling(database_url), combined=True) as app,
        disagreeing_registry() as registry,
    ):
        tenant = await app.new_tenant()
        accounts = await add_servers_with_mailboxes(app, tenant, starttls_server, dovecot)
        subject = reader(app)
        subject.source = HttpMailboxSource(registry, "token", app.app.state.sessions)
        read = await subject.poll_all()
        no_canary_in(caplog.records)
        with pytest.raises(AccessUnavailable) as raised:
            await subject.source.endpoint(uuid.uuid4(), rejected="0" * 64)
        assert "port" in str(raised.value)
        senders = HttpRegistry(registry, "token")
        for call in (senders.fetch(uuid.uuid4()), senders.refresh(uuid.uuid4(), "0" * 64)):
            with pytest.raises(DependencyUnavailable) as failed:
                await call
            logging.getLogger("abl.test").exception("sender: %s", failed.value)
        logging.getLogger("abl.test").exception("reader: %s", raised.value, exc_info=raised.value)
    no_canary_in(caplog.records)
    assert any("no access" in r.getMessage() for r in caplog.records)
    assert read == dict.fromkeys(
        map(uuid.UUID, accounts), "the registry did not give the mailbox access"
    )


def no_canary_in(records: list[logging.LogRecord]) -> None:
    for record in records:
        assert CANARY not in logging.Formatter().format(record)
