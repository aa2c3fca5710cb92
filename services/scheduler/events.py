"""The scheduler's events, written to its outbox in the transaction that changes the emails
or servers they describe: an email's final status (email.sent, email.failed, email.unknown,
and the deliverability statuses when they exist), a server parked for its quota or back."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler.models import SchedulerOutbox
from shared import outbox
from shared.db import table_of
from shared.events import Event, email_event, server_status_event

OUTBOX = table_of(SchedulerOutbox)


@dataclass(frozen=True)
class Finished:
    """What an event says about an email that reached a final status."""

    email_id: uuid.UUID
    tenant_id: uuid.UUID
    status: str
    server_id: uuid.UUID | None
    campaign: str | None
    attempts: int
    smtp_code: int | None
    smtp_reply: str | None


def email_events(finished: Iterable[Finished], at: datetime) -> list[Event]:
    events = []
    for f in finished:
        made = email_event(
            f.status,
            tenant_id=f.tenant_id,
            email_id=f.email_id,
            server_id=f.server_id,
            campaign=f.campaign,
            attempts=f.attempts,
            smtp_code=f.smtp_code,
            smtp_reply=f.smtp_reply,
            at=at,
        )
        if made is not None:
            events.append(made)
    return events


def parked_event(
    tenant_id: uuid.UUID, server_id: uuid.UUID, reason: str, until: datetime, at: datetime
) -> Event:
    return server_status_event(
        tenant_id=tenant_id,
        server_id=server_id,
        status="parked",
        previous="active",
        reason=reason,
        at=at,
        until=until,
    )


async def write(session: AsyncSession, events: list[Event]) -> None:
    """Into the caller's transaction; published after it commits."""
    if events:
        await session.exec(OUTBOX.insert(), params=outbox.rows(events))
        outbox.mark_written(session.sync_session, OUTBOX.name)
