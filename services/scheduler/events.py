"""The scheduler's events, written to its outbox in the transaction that changes the emails
or servers they describe: an email's final status (email.sent, email.failed, email.unknown),
what its mailbox said later (email.bounced, email.replied), a server parked for its quota or
active again, and a server's warmup stepping up."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler.models import Email, EmailStatus, SchedulerOutbox
from shared import outbox
from shared.db import table_of
from shared.events import Event, EventType, email_event, server_status_event

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


def feedback_events(emails: Sequence[Email], at: datetime) -> list[Event]:
    """email.bounced / email.replied for emails the mailbox reader just moved there; a bounce
    says what the notification said (its status code and diagnostic)."""
    made = email_events(
        (
            Finished(
                e.id,
                e.tenant_id,
                e.status,
                e.server_id,
                e.campaign,
                e.attempts,
                e.last_smtp_code,
                e.last_smtp_reply,
            )
            for e in emails
        ),
        at,
    )
    bounces = {str(e.id): e for e in emails if e.status == EmailStatus.bounced}
    for event in made:
        if (bounced := bounces.get(event.data["email_id"])) is not None:
            event.data |= {
                "bounce_status": bounced.bounce_status,
                "diagnostic": bounced.bounce_diagnostic,
            }
    return made


def suppressed_events(
    tenant_id: uuid.UUID, rows: Iterable[tuple[uuid.UUID, str | None, int]], at: datetime
) -> list[Event]:
    """email.suppressed for queued emails (id, campaign, attempts) stopped by a suppression."""
    return email_events(
        (
            Finished(
                email_id, tenant_id, EmailStatus.suppressed, None, campaign, attempts, None, None
            )
            for email_id, campaign, attempts in rows
        ),
        at,
    )


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


def unparked_event(tenant_id: uuid.UUID, server_id: uuid.UUID, at: datetime) -> Event:
    return server_status_event(
        tenant_id=tenant_id,
        server_id=server_id,
        status="active",
        previous="parked",
        reason="the provider's quota window is over",
        at=at,
    )


@dataclass(frozen=True)
class WarmupStep:
    """A server whose daily allowance stepped up on a new day."""

    server_id: uuid.UUID
    tenant_id: uuid.UUID
    day: date
    step: int
    previous_step: int
    allowance: int
    previous_allowance: int
    top_step: int


def warmup_step_event(step: WarmupStep, at: datetime) -> Event:
    return Event(
        type=EventType.server_warmup_step,
        tenant_id=step.tenant_id,
        timestamp=at,
        data={
            "server_id": str(step.server_id),
            "day": step.day.isoformat(),
            "step": step.step,
            "previous_step": step.previous_step,
            "allowance": step.allowance,
            "previous_allowance": step.previous_allowance,
            "top_step": step.top_step,
        },
    )


async def write(session: AsyncSession, events: list[Event]) -> None:
    """Into the caller's transaction; published after it commits."""
    if events:
        await session.exec(OUTBOX.insert(), params=outbox.rows(events))
        outbox.mark_written(session.sync_session, OUTBOX.name)
