"""The scheduler's use cases without HTTP, on SQLite through the session factory: what accept
and cancel decide (duplicates, the dispatcher's wake-up, which cancel must reach the senders).
The routes' answers are tested in test_scheduler_api.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import service as registry
from services.scheduler import service
from services.scheduler.lifecycle import EmailStatus
from services.scheduler.models import Accepted, Email, EmailCreate, ItemStatus
from shared.db import create_engine, session_factory, table_of
from shared.timeutil import utcnow


@dataclass
class Scheduler:
    sessions: async_sessionmaker[AsyncSession]
    tenant_id: uuid.UUID
    wake: asyncio.Event


@pytest.fixture
async def scheduler(sqlite_url: str) -> AsyncIterator[Scheduler]:
    engine = create_engine(sqlite_url)
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        tenant = await registry.create_tenant(session, "acme")
    try:
        yield Scheduler(sessions, tenant.id, asyncio.Event())
    finally:
        await engine.dispose()


def email(to: str, key: str | None = None) -> EmailCreate:
    return EmailCreate(to=to, subject="Hello", text="Hi.", idempotency_key=key)


async def accept(scheduler: Scheduler, items: list[EmailCreate]) -> Accepted:
    async with scheduler.sessions() as session, session.begin():
        return await service.accept(session, scheduler.tenant_id, items, utcnow(), scheduler.wake)


async def test_a_batch_sent_again_queues_nothing_twice(scheduler: Scheduler) -> None:
    batch = [email("ada@example.org", "ada"), email("grace@example.org", "grace")]
    first = await accept(scheduler, batch)
    assert [item.status for item in first.items] == [ItemStatus.queued, ItemStatus.queued]
    assert scheduler.wake.is_set(), "new emails wake the dispatcher"
    again = await accept(scheduler, [*batch, email("linus@example.org")])
    assert again.ids[:2] == first.ids
    assert [item.status for item in again.items] == [
        ItemStatus.duplicate,
        ItemStatus.duplicate,
        ItemStatus.queued,
    ]
    assert (again.queued, again.duplicates, again.active_servers) == (1, 2, 0)
    assert again.warning == service.NO_ACTIVE_SERVER


async def test_a_key_twice_in_one_batch_stores_nothing(scheduler: Scheduler) -> None:
    with pytest.raises(service.DuplicateIdempotencyKey):
        await accept(scheduler, [email("ada@example.org", "k"), email("grace@example.org", "k")])
    async with scheduler.sessions() as session:
        rows, _ = await service.list_emails(
            session,
            scheduler.tenant_id,
            status=None,
            campaign=None,
            server_id=None,
            after=None,
            limit=10,
        )
    assert list(rows) == []


async def test_only_the_cancel_of_a_scheduled_email_goes_to_the_senders(
    scheduler: Scheduler,
) -> None:
    queued_id, scheduled_id = (await accept(scheduler, [email("a@x.org"), email("b@x.org")])).ids
    job_id = uuid.uuid4()
    table = table_of(Email)
    async with scheduler.sessions() as session, session.begin():
        await session.exec(
            update(table)
            .where(table.c.id == scheduled_id)
            .values(status=EmailStatus.scheduled.value, job_id=job_id)
        )
    async with scheduler.sessions() as session, session.begin():
        queued = await service.cancel(session, scheduler.tenant_id, queued_id, utcnow())
        scheduled = await service.cancel(session, scheduler.tenant_id, scheduled_id, utcnow())
    assert (queued.email.status, queued.notice) == (EmailStatus.canceled, None)
    assert scheduled.email.status == EmailStatus.canceled
    assert scheduled.notice is not None
    assert (scheduled.notice.email_id, scheduled.notice.job_id) == (scheduled_id, job_id)
    with pytest.raises(service.NotCancelable) as refused:
        async with scheduler.sessions() as session, session.begin():
            await service.cancel(session, scheduler.tenant_id, queued_id, utcnow())
    assert refused.value.detail == "This email is already canceled."
