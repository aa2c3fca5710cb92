"""The mailbox reader and the bounce-rate guard in the stack (registry, scheduler and a sender as
separate processes on PostgreSQL and RabbitMQ, the sending mailboxes on a real Dovecot): the
scheduler gets each mailbox's access from the registry's internal route and reports its reads
and a `paused_bounces` pause back, so `GET /v1/servers/{id}` shows them.

A campaign through three servers, then a sequence's follow-ups: some recipients bounce (DSNs in
one server's mailbox, enough to cross the threshold), some reply, one auto-replies. Every email
ends with the right status, the follow-ups of repliers and bounced recipients are canceled, the
bouncing server is paused and the remaining follow-ups are sent by the other two, as counted at
the SMTP server."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ACCOUNTS, AMQP_URL, require_service
from tests.support import mailbox_messages as mail
from tests.support.dovecot import DovecotServer
from tests.support.processes import add_smtp_servers, new_tenant
from tests.support.smtp import Certificates, smtp_server
from tests.test_stack import Stack, running_stack, wait_until, warm_up

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

LEADS = 30
DAILY_CAP = 10  # per server: the first campaign fills today's allowance of all three


@pytest.fixture
def stack(migrated_postgres: str, certs: Certificates, tmp_path: Path) -> Iterator[Stack]:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    with running_stack(
        migrated_postgres,
        AMQP_URL,
        certs,
        tmp_path,
        ABL_INBOX_POLL_SECONDS="0.5",
        ABL_INBOX_TIMEOUT_SECONDS="10",
        ABL_BOUNCE_MIN_SENT="10",
    ) as value:
        yield value


async def open_tomorrow(url: str, server_ids: list[str], allowance: int) -> None:
    """Test set-up: today's allowance raised, as the next day's would be."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "UPDATE server_days SET allowance = $1 WHERE server_id = ANY($2::uuid[])",
            allowance,
            [uuid.UUID(s) for s in server_ids],
        )
    finally:
        await connection.close()


def all_emails(client: httpx.Client, tenant: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/messages", params=params, headers=tenant).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def test_bounces_and_replies_read_in_the_stack_pause_a_server_and_stop_sequences(
    stack: Stack, certs: Certificates, dovecot: DovecotServer
) -> None:
    run = uuid.uuid4().hex[:6]
    leads = [f"lead{i}.{run}@example.org" for i in range(LEADS)]
    with smtp_server(certs, ACCOUNTS) as smtp:
        stack.sender("sender-1")
        registry = httpx.Client(base_url=stack.registry.url, timeout=30)
        scheduler = httpx.Client(base_url=stack.scheduler.url, timeout=30)
        tenant = new_tenant(registry, stack.settings.admin_token.get_secret_value())
        servers = add_smtp_servers(
            registry,
            tenant,
            smtp.port,
            ACCOUNTS,
            daily_cap=DAILY_CAP,
            imap={"host": "localhost", "port": dovecot.tls_port},
        )
        login_of = {str(s["id"]): str(s["username"]) for s in servers}
        asyncio.run(warm_up(stack.settings.database_url, list(login_of)))

        def sequence_step(subject: str) -> list[str]:
            step = [
                {"to": to, "subject": subject, "text": "x", "sequence": "intro"} for to in leads
            ]
            accepted = scheduler.post("/v1/messages", json={"messages": step}, headers=tenant)
            assert accepted.status_code == 202, accepted.text
            ids: list[str] = accepted.json()["ids"]
            return ids

        intro_ids = sequence_step("Hi")
        wait_until(lambda: smtp.recorder.accepted.total() == LEADS, seconds=90)
        assert set(smtp.recorder.accepted.values()) == {DAILY_CAP}  # through all three
        # The follow-ups wait: every server has sent today's allowance.
        follow_ids = sequence_step("Again")

        def email(email_id: str) -> dict[str, Any]:
            found: dict[str, Any] = scheduler.get(f"/v1/messages/{email_id}", headers=tenant).json()
            return found

        wait_until(lambda: all(email(i)["status"] == "sent" for i in intro_ids), seconds=60)
        by_server: dict[str, list[int]] = {}
        for index, email_id in enumerate(intro_ids):
            by_server.setdefault(str(email(email_id)["server_id"]), []).append(index)
        bad, good, other = sorted(by_server, key=lambda s: by_server[s][0])
        bounced = by_server[bad][:3]  # 3 of its 10 sent: 30 % > 5 %
        replied = [*by_server[good][:2], by_server[other][0]]
        auto = by_server[other][1]

        mailbox_of = {i: login_of[server] for server, found in by_server.items() for i in found}

        def our_id(index: int) -> str:
            return mail.our_message_id(intro_ids[index], "example.com")  # the from domain

        for index in bounced:
            dovecot.append(mailbox_of[index], mail.dsn(leads[index], our_id(index)))
        for index in replied:
            dovecot.append(mailbox_of[index], mail.reply(leads[index], our_id(index)))
        dovecot.append(mailbox_of[auto], mail.reply(leads[auto], our_id(auto), auto=True))

        def read_back() -> bool:
            return all(email(intro_ids[i])["status"] == "bounced" for i in bounced) and all(
                email(intro_ids[i])["status"] == "replied" for i in replied
            )

        wait_until(read_back, seconds=60)
        paused = registry.get(f"/v1/servers/{bad}", headers=tenant).json()
        assert paused["status"] == "paused_bounces"
        # Paused as soon as a read crossed the threshold (2 or 3 of its 10 sent).
        assert re.search(r"hard bounces [23] of the last 10 sent", paused["status_reason"])
        for server_id in login_of:
            view = registry.get(f"/v1/servers/{server_id}", headers=tenant).json()
            assert view["imap"]["last_poll_at"] is not None
            assert view["imap"]["last_poll_error"] is None
            assert "password" not in view["imap"]
            if server_id != bad:
                assert view["status"] == "active"
        stopped = {follow_ids[i] for i in [*bounced, *replied]}
        wait_until(lambda: all(email(i)["status"] == "canceled" for i in stopped), seconds=30)
        first_bounce = email(intro_ids[bounced[0]])
        assert first_bounce["bounce_status"] == "5.1.1"
        assert email(intro_ids[auto])["status"] == "sent"  # an auto-reply is not a reply

        # The next day: the follow-ups still queued go out, none through the paused server.
        asyncio.run(open_tomorrow(stack.settings.database_url, list(login_of), 100))
        remaining = LEADS - len(stopped)
        wait_until(lambda: smtp.recorder.accepted.total() == LEADS + remaining, seconds=90)
        assert smtp.recorder.accepted[login_of[bad]] == DAILY_CAP
        # Accepted at the SMTP server first, recorded once the results are applied.
        wait_until(
            lambda: (
                not {"queued", "scheduled"} & {e["status"] for e in all_emails(scheduler, tenant)}
            ),
            seconds=60,
        )
        emails = all_emails(scheduler, tenant)
        final = Counter(
            ("intro" if e["subject"] == "Hi" else "follow", e["status"]) for e in emails
        )
        assert final == {
            ("intro", "sent"): LEADS - len(bounced) - len(replied),
            ("intro", "bounced"): len(bounced),
            ("intro", "replied"): len(replied),
            ("follow", "sent"): remaining,
            ("follow", "canceled"): len(stopped),
        }
        assert bad not in {str(e["server_id"]) for e in emails if e["subject"] == "Again"}
        # A bounced address is refused on the next campaign.
        again = scheduler.post(
            "/v1/messages",
            json={"messages": [{"to": leads[bounced[0]], "subject": "Hi", "text": "x"}]},
            headers=tenant,
        )
        assert again.json()["items"][0]["status"] == "suppressed"
    # The mailbox passwords went to the scheduler over HTTP only: no log holds one.
    for log in stack.logs.glob("*.log"):
        text = log.read_text()
        assert not any(password in text for password in ACCOUNTS.values()), log.name
