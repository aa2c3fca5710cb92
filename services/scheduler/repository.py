"""Data access of the scheduler: emails, warmup state, allowances and reservations."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date, datetime, timedelta

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import domain
from services.scheduler.domain import SendingWindow, WarmupSchedule
from services.scheduler.models import (
    Email,
    EmailStatus,
    SendingProfile,
    ServerDay,
    ServerUsageHour,
    ServerWarmup,
)
from shared.db import insert_ignore, is_postgres, table_of, upsert_increment
from shared.errors import NotFound
from shared.registry_read import ServerView


def email_not_found(email_id: uuid.UUID) -> NotFound:
    return NotFound(
        f"No email {email_id} for this tenant.",
        code="email_not_found",
        hint="List your emails with GET /v1/messages.",
    )


async def get_email(session: AsyncSession, tenant_id: uuid.UUID, email_id: uuid.UUID) -> Email:
    query = select(Email).where(Email.id == email_id, Email.tenant_id == tenant_id)
    email = (await session.exec(query)).first()
    if email is None:
        raise email_not_found(email_id)
    return email


async def emails_by_keys(
    session: AsyncSession, tenant_id: uuid.UUID, keys: Sequence[str]
) -> dict[str, uuid.UUID]:
    if not keys:
        return {}
    query = select(Email.idempotency_key, Email.id).where(
        Email.tenant_id == tenant_id, col(Email.idempotency_key).in_(keys)
    )
    return {key: email_id for key, email_id in (await session.exec(query)).all() if key}


async def add_emails(session: AsyncSession, emails: Sequence[Email]) -> bool:
    """Insert emails; False when an idempotency key raced in from another request."""
    session.add_all(emails)
    try:
        await session.flush()
    except IntegrityError:
        return False
    return True


async def list_emails(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    *,
    status: EmailStatus | None,
    campaign: str | None,
    server_id: uuid.UUID | None,
    after: uuid.UUID | None,
    limit: int,
) -> tuple[Sequence[Email], uuid.UUID | None]:
    query = select(Email).where(Email.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Email.status == status)
    if campaign is not None:
        query = query.where(Email.campaign == campaign)
    if server_id is not None:
        query = query.where(Email.server_id == server_id)
    if after is not None:
        query = query.where(col(Email.id) > after)
    rows = (await session.exec(query.order_by(col(Email.id)).limit(limit + 1))).all()
    return rows[:limit], (rows[limit - 1].id if len(rows) > limit else None)


async def sending_window(session: AsyncSession, tenant_id: uuid.UUID) -> SendingWindow:
    profile = await session.get(SendingProfile, tenant_id)
    if profile is None:
        return SendingWindow()
    return SendingWindow(profile.time_zone, profile.start_hour, profile.end_hour)


# --- warmup and allowances ----------------------------------------------------------------


async def warmup_state(
    session: AsyncSession,
    server: ServerView,
    today: date,
    schedule: WarmupSchedule,
) -> ServerWarmup:
    """The server's warmup row, folded forward to `today` (created fresh for a new server)."""
    row = await session.get(ServerWarmup, server.id)
    if row is None:
        await session.exec(
            insert_ignore(
                session,
                table_of(ServerWarmup),
                {
                    "server_id": server.id,
                    "tenant_id": server.tenant_id,
                    "step": 1,
                    "state_day": today,
                    "idle_days": 0,
                },
            )
        )
        row = await session.get(ServerWarmup, server.id)
        assert row is not None
    if row.state_day < today:
        days = (
            await session.exec(
                select(ServerDay).where(
                    ServerDay.server_id == server.id,
                    col(ServerDay.day) >= row.state_day,
                    col(ServerDay.day) < today,
                )
            )
        ).all()
        state = domain.state_on(
            domain.WarmupState(row.step, row.state_day, row.idle_days),
            today,
            delivered={d.day: d.sent for d in days},
            allowances={d.day: d.allowance for d in days},
            schedule=schedule,
            daily_cap=server.daily_cap,
        )
        row.step, row.state_day, row.idle_days = state.step, state.day, state.idle_days
        session.add(row)
        await session.flush()
    return row


async def server_day(
    session: AsyncSession, server: ServerView, day: date, allowance: int
) -> ServerDay:
    """Today's counter row, created with today's allowance the first time it is needed."""
    await session.exec(
        insert_ignore(
            session,
            table_of(ServerDay),
            {
                "server_id": server.id,
                "day": day,
                "tenant_id": server.tenant_id,
                "allowance": allowance,
                "reserved": 0,
                "sent": 0,
            },
        )
    )
    row = await session.get(ServerDay, (server.id, day), populate_existing=True)
    assert row is not None
    return row


async def usage_by_hour(
    session: AsyncSession, server_id: uuid.UUID, now: datetime
) -> dict[datetime, int]:
    since = now - timedelta(hours=25)
    rows = (
        await session.exec(
            select(ServerUsageHour).where(
                ServerUsageHour.server_id == server_id, col(ServerUsageHour.hour) >= since
            )
        )
    ).all()
    return {row.hour: row.used for row in rows}


async def reserve(
    session: AsyncSession, server_id: uuid.UUID, day: date, wanted: int, now: datetime
) -> int:
    """Reserve up to `wanted` sends on a server's day; return how many were granted.

    The guarded UPDATE is the atomic step: it never lets `reserved` pass `allowance`, however
    many schedulers run at once. It also locks the row, so the rolling 24-hour count read after
    it sees every reservation committed before and none can slip in until this one commits.
    """
    table = table_of(ServerDay)
    granted = wanted
    while granted > 0:
        result = await session.exec(
            update(table)
            .where(
                table.c.server_id == server_id,
                table.c.day == day,
                table.c.reserved + granted <= table.c.allowance,
            )
            .values(reserved=table.c.reserved + granted)
        )
        if result.rowcount == 1:
            break
        row = await session.get(ServerDay, (server_id, day), populate_existing=True)
        if row is None:
            return 0
        granted = min(granted, row.allowance - row.reserved)
    if granted <= 0:
        return 0
    row = await session.get(ServerDay, (server_id, day), populate_existing=True)
    assert row is not None
    over = domain.rolling_used(await usage_by_hour(session, server_id, now), now) + granted
    excess = max(0, over - row.allowance)
    if excess:
        await session.exec(
            update(table)
            .where(table.c.server_id == server_id, table.c.day == day)
            .values(reserved=table.c.reserved - excess)
        )
        granted -= excess
    if granted > 0:
        await add_hour_usage(session, server_id, domain.hour_bucket(now), granted)
    return granted


async def add_hour_usage(
    session: AsyncSession, server_id: uuid.UUID, hour: datetime, amount: int
) -> None:
    await session.exec(
        upsert_increment(
            session,
            table_of(ServerUsageHour),
            {"server_id": server_id, "hour": hour},
            "used",
            amount,
        )
    )


async def release(
    session: AsyncSession, server_id: uuid.UUID, day: date | None, hour: datetime | None
) -> None:
    """Give one reservation back: the attempt failed before the server accepted the data."""
    if day is not None:
        table = table_of(ServerDay)
        await session.exec(
            update(table)
            .where(table.c.server_id == server_id, table.c.day == day, table.c.reserved > 0)
            .values(reserved=table.c.reserved - 1)
        )
    if hour is not None:
        hours = table_of(ServerUsageHour)
        await session.exec(
            update(hours)
            .where(hours.c.server_id == server_id, hours.c.hour == hour, hours.c.used > 0)
            .values(used=hours.c.used - 1)
        )


async def count_delivered(session: AsyncSession, server_id: uuid.UUID, day: date) -> None:
    table = table_of(ServerDay)
    await session.exec(
        update(table)
        .where(table.c.server_id == server_id, table.c.day == day)
        .values(sent=table.c.sent + 1)
    )


# --- dispatch -----------------------------------------------------------------------------


async def tenants_with_due_emails(session: AsyncSession, now: datetime) -> list[uuid.UUID]:
    query = (
        select(Email.tenant_id)
        .where(Email.status == EmailStatus.queued, col(Email.not_before) <= now)
        .distinct()
    )
    return list((await session.exec(query)).all())


async def due_count(session: AsyncSession, tenant_id: uuid.UUID, now: datetime) -> int:
    query = select(func.count()).where(
        Email.tenant_id == tenant_id,
        Email.status == EmailStatus.queued,
        col(Email.not_before) <= now,
    )
    return int((await session.exec(query)).one())


async def claim_due(
    session: AsyncSession, tenant_id: uuid.UUID, limit: int, now: datetime
) -> list[Email]:
    """Lock the tenant's oldest due emails; other replicas skip the locked ones."""
    query = (
        select(Email)
        .where(
            Email.tenant_id == tenant_id,
            Email.status == EmailStatus.queued,
            col(Email.not_before) <= now,
        )
        .order_by(col(Email.id))
        .limit(limit)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    return list((await session.exec(query)).all())


async def expired_leases(session: AsyncSession, now: datetime, limit: int) -> list[Email]:
    query = (
        select(Email)
        .where(
            Email.status == EmailStatus.scheduled,
            col(Email.published_at).is_(None),
            col(Email.lease_until) < now,
        )
        .order_by(col(Email.id))
        .limit(limit)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    return list((await session.exec(query)).all())


async def mark_published(
    session: AsyncSession, jobs: Sequence[tuple[uuid.UUID, uuid.UUID]], now: datetime
) -> None:
    table = table_of(Email)
    for email_id, job_id in jobs:
        await session.exec(
            update(table)
            .where(table.c.id == email_id, table.c.job_id == job_id, table.c.published_at.is_(None))
            .values(published_at=now)
        )


async def parked_servers(
    session: AsyncSession, tenant_id: uuid.UUID, now: datetime
) -> set[uuid.UUID]:
    query = select(ServerWarmup.server_id).where(
        ServerWarmup.tenant_id == tenant_id, col(ServerWarmup.parked_until) > now
    )
    return set((await session.exec(query)).all())


async def park(session: AsyncSession, server_id: uuid.UUID, until: datetime, reason: str) -> None:
    table = table_of(ServerWarmup)
    await session.exec(
        update(table)
        .where(table.c.server_id == server_id)
        .values(parked_until=until, park_reason=reason[:200])
    )
