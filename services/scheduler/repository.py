"""Data access of the scheduler: emails, warmup state, allowances and reservations."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

from sqlalchemy import Integer, Uuid, bindparam, column, func, update, values
from sqlalchemy import select as sa_select
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


class SendResultKey(NamedTuple):
    """What names one attempt of one email, as a result event does."""

    email_id: uuid.UUID
    job_id: uuid.UUID
    tenant_id: uuid.UUID
    server_id: uuid.UUID


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


def limits_of(server: ServerView, schedule: WarmupSchedule) -> domain.ServerLimits:
    return domain.server_limits(server.host, server.username, server.daily_cap, schedule)


async def warmup_states(
    session: AsyncSession,
    servers: Sequence[ServerView],
    today: date,
    schedule: WarmupSchedule,
) -> dict[uuid.UUID, ServerWarmup]:
    """Each server's warmup row, folded forward to `today` (created fresh for a new server)."""
    if not servers:
        return {}
    by_id = {server.id: server for server in servers}
    query = select(ServerWarmup).where(col(ServerWarmup.server_id).in_(by_id))
    rows = {row.server_id: row for row in (await session.exec(query)).all()}
    missing = [server for server in servers if server.id not in rows]
    if missing:
        await session.exec(
            insert_ignore(
                session,
                table_of(ServerWarmup),
                [
                    {
                        "server_id": s.id,
                        "tenant_id": s.tenant_id,
                        "step": 1,
                        "state_day": today,
                        "idle_days": 0,
                    }
                    for s in missing
                ],
            )
        )
        query = select(ServerWarmup).where(col(ServerWarmup.server_id).in_([s.id for s in missing]))
        rows.update({row.server_id: row for row in (await session.exec(query)).all()})
    stale = [row for row in rows.values() if row.state_day < today]
    if stale:
        history = (
            await session.exec(
                select(ServerDay).where(
                    col(ServerDay.server_id).in_([row.server_id for row in stale]),
                    col(ServerDay.day) >= min(row.state_day for row in stale),
                    col(ServerDay.day) < today,
                )
            )
        ).all()
        for row in stale:
            days = [d for d in history if d.server_id == row.server_id]
            state = domain.state_on(
                domain.WarmupState(row.step, row.state_day, row.idle_days),
                today,
                delivered={d.day: d.sent for d in days},
                allowances={d.day: d.allowance for d in days},
                schedule=schedule,
                daily_cap=limits_of(by_id[row.server_id], schedule).top,
            )
            row.step, row.state_day, row.idle_days = state.step, state.day, state.idle_days
            session.add(row)
        await session.flush()
    return rows


async def warmup_state(
    session: AsyncSession, server: ServerView, today: date, schedule: WarmupSchedule
) -> ServerWarmup:
    return (await warmup_states(session, [server], today, schedule))[server.id]


async def server_days(
    session: AsyncSession,
    servers: Sequence[ServerView],
    day: date,
    allowances: dict[uuid.UUID, int],
) -> dict[uuid.UUID, ServerDay]:
    """Each server's counter row for `day`, created with that day's allowance when first needed.

    The allowance is fixed for the day once the row exists.
    """
    if not servers:
        return {}
    await session.exec(
        insert_ignore(
            session,
            table_of(ServerDay),
            [
                {
                    "server_id": s.id,
                    "day": day,
                    "tenant_id": s.tenant_id,
                    "allowance": allowances[s.id],
                    "reserved": 0,
                    "sent": 0,
                }
                for s in servers
            ],
        )
    )
    query = (
        select(ServerDay)
        .where(col(ServerDay.server_id).in_([s.id for s in servers]), ServerDay.day == day)
        .execution_options(populate_existing=True)
    )
    return {row.server_id: row for row in (await session.exec(query)).all()}


async def server_day(
    session: AsyncSession, server: ServerView, day: date, allowance: int
) -> ServerDay:
    return (await server_days(session, [server], day, {server.id: allowance}))[server.id]


async def rolling_usage(
    session: AsyncSession, server_ids: Sequence[uuid.UUID], now: datetime
) -> dict[uuid.UUID, int]:
    """Reservations of each server in the rolling 24 hours (see `domain.rolling_used`)."""
    if not server_ids:
        return {}
    hours = table_of(ServerUsageHour)
    query = (
        select(hours.c.server_id, func.sum(hours.c.used))
        .where(
            hours.c.server_id.in_(server_ids),
            hours.c.hour >= domain.rolling_window_start(now),
        )
        .group_by(hours.c.server_id)
    )
    rows = (await session.exec(query)).all()
    return {server_id: int(total or 0) for server_id, total in rows}


async def _reserve_daily(
    session: AsyncSession, server_id: uuid.UUID, day: date, wanted: int
) -> int:
    """The guarded UPDATE: `reserved` never passes `allowance`, whoever runs at once.

    It also locks the row until commit, which serialises every reservation on this server.
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
            return granted
        row = await session.get(ServerDay, (server_id, day), populate_existing=True)
        if row is None:
            return 0
        granted = min(granted, row.allowance - row.reserved)
    return 0


async def _reserve_daily_bulk(
    session: AsyncSession, day: date, wanted: dict[uuid.UUID, int]
) -> set[uuid.UUID]:
    """PostgreSQL: the same guard for many servers in one statement; returns who got it all."""
    table = table_of(ServerDay)
    wants = values(column("server_id", Uuid), column("wanted", Integer), name="wants").data(
        sorted(wanted.items())
    )
    statement = (
        update(table)
        .where(
            table.c.server_id == wants.c.server_id,
            table.c.day == day,
            table.c.reserved + wants.c.wanted <= table.c.allowance,
        )
        .values(reserved=table.c.reserved + wants.c.wanted)
        .returning(table.c.server_id)
    )
    return set((await session.exec(statement)).scalars().all())


async def reserve_many(
    session: AsyncSession, day: date, wanted: dict[uuid.UUID, int], now: datetime
) -> dict[uuid.UUID, int]:
    """Reserve sends on many servers' `day`; return what each was granted.

    After the daily guard has locked the servers' rows, the rolling 24-hour count is read: it
    sees every reservation committed before, and none can slip in until this one commits.
    """
    wanted = {server_id: n for server_id, n in wanted.items() if n > 0}
    granted: dict[uuid.UUID, int] = {}
    if wanted and is_postgres(session):
        for server_id in await _reserve_daily_bulk(session, day, wanted):
            granted[server_id] = wanted[server_id]
    for server_id, n in sorted(wanted.items()):
        if server_id not in granted:
            granted[server_id] = await _reserve_daily(session, server_id, day, n)
    granted = {server_id: n for server_id, n in granted.items() if n > 0}
    if not granted:
        return {}
    rows = {
        row.server_id: row
        for row in (
            await session.exec(
                select(ServerDay)
                .where(col(ServerDay.server_id).in_(granted), ServerDay.day == day)
                .execution_options(populate_existing=True)
            )
        ).all()
    }
    rolling = await rolling_usage(session, list(granted), now)
    table = table_of(ServerDay)
    for server_id, n in list(granted.items()):
        excess = max(0, rolling.get(server_id, 0) + n - rows[server_id].allowance)
        if excess:
            await session.exec(
                update(table)
                .where(table.c.server_id == server_id, table.c.day == day)
                .values(reserved=table.c.reserved - excess)
            )
            granted[server_id] = n - excess
    granted = {server_id: n for server_id, n in granted.items() if n > 0}
    await add_hour_usage(session, granted, domain.hour_bucket(now))
    return granted


async def reserve(
    session: AsyncSession, server_id: uuid.UUID, day: date, wanted: int, now: datetime
) -> int:
    """Reserve up to `wanted` sends on one server's day; return how many were granted."""
    return (await reserve_many(session, day, {server_id: wanted}, now)).get(server_id, 0)


async def add_hour_usage(
    session: AsyncSession, amounts: dict[uuid.UUID, int], hour: datetime
) -> None:
    if amounts:
        await session.exec(
            upsert_increment(
                session,
                table_of(ServerUsageHour),
                [
                    {"server_id": server_id, "hour": hour, "used": n}
                    for server_id, n in sorted(amounts.items())
                ],
                keys=("server_id", "hour"),
                column="used",
            )
        )


async def release(
    session: AsyncSession, server_id: uuid.UUID, day: date | None, hour: datetime | None
) -> None:
    """Give one reservation back: the attempt failed before the server accepted the data."""
    await release_many(session, server_id, day=day, hour=hour, count=1)


def _at_least_zero(session: AsyncSession, value: Any) -> Any:
    # GREATEST on PostgreSQL; SQLite's two-argument max() is the same scalar function.
    return func.greatest(value, 0) if is_postgres(session) else func.max(value, 0)


async def release_many(
    session: AsyncSession,
    server_id: uuid.UUID,
    *,
    day: date | None,
    hour: datetime | None,
    count: int,
) -> None:
    """Give `count` reservations back on a server's day and/or hour bucket (never below 0)."""
    if day is not None:
        table = table_of(ServerDay)
        await session.exec(
            update(table)
            .where(table.c.server_id == server_id, table.c.day == day)
            .values(reserved=_at_least_zero(session, table.c.reserved - count))
        )
    if hour is not None:
        hours = table_of(ServerUsageHour)
        await session.exec(
            update(hours)
            .where(hours.c.server_id == server_id, hours.c.hour == hour)
            .values(used=_at_least_zero(session, hours.c.used - count))
        )


async def count_delivered(
    session: AsyncSession, server_id: uuid.UUID, day: date, count: int = 1
) -> None:
    table = table_of(ServerDay)
    await session.exec(
        update(table)
        .where(table.c.server_id == server_id, table.c.day == day)
        .values(sent=table.c.sent + count)
    )


# --- dispatch -----------------------------------------------------------------------------


async def tenants_with_due_emails(session: AsyncSession, now: datetime) -> list[uuid.UUID]:
    query = (
        select(Email.tenant_id)
        .where(Email.status == EmailStatus.queued, col(Email.not_before) <= now)
        .distinct()
    )
    return list((await session.exec(query)).all())


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
    statement = (
        update(table)
        .where(
            table.c.id == bindparam("email"),
            table.c.job_id == bindparam("job"),
            table.c.published_at.is_(None),
        )
        .values(published_at=now)
    )
    connection = await session.connection()
    await connection.execute(statement, [{"email": e, "job": j} for e, j in jobs])


async def try_lock_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> bool:
    """One dispatcher per tenant at a time (PostgreSQL advisory lock, held until commit).

    The allowance guard is what keeps the cap; this lock keeps replicas from contending for the
    same servers' rows, and keeps the even share exact.
    """
    if not is_postgres(session):
        return True  # SQLite has a single writer already
    key = int.from_bytes(tenant_id.bytes[:8], "big", signed=True)
    result = await session.exec(select(func.pg_try_advisory_xact_lock(key)))
    return bool(result.one())


async def park(session: AsyncSession, server_id: uuid.UUID, until: datetime, reason: str) -> None:
    table = table_of(ServerWarmup)
    await session.exec(
        update(table)
        .where(table.c.server_id == server_id)
        .values(parked_until=until, park_reason=reason[:200])
    )


async def expire_all_leases(session: AsyncSession) -> None:
    """Make every scheduled email's job due for publishing again (in-process bus restart)."""
    table = table_of(Email)
    await session.exec(
        update(table)
        .where(table.c.status == EmailStatus.scheduled)
        .values(published_at=None, lease_until=datetime(2000, 1, 1, tzinfo=UTC))
    )


async def sendable_jobs(
    session: AsyncSession, jobs: Sequence[tuple[uuid.UUID, uuid.UUID]]
) -> set[uuid.UUID]:
    """Of these (email, job) pairs, the jobs still their email's current, unsent attempt."""
    if not jobs:
        return set()
    wanted = dict(jobs)
    query = select(Email.id, Email.job_id).where(
        col(Email.id).in_(list(wanted)), Email.status == EmailStatus.scheduled
    )
    return {
        job_id
        for email_id, job_id in (await session.exec(query)).all()
        if job_id is not None and wanted.get(email_id) == job_id
    }


async def stale_scheduled(
    session: AsyncSession, published_before: datetime, limit: int
) -> list[SendResultKey]:
    """Emails published before `published_before` that never got a result."""
    table = table_of(Email)
    query = (
        sa_select(table.c.id, table.c.job_id, table.c.tenant_id, table.c.server_id)
        .where(
            table.c.status == EmailStatus.scheduled,
            table.c.published_at.is_not(None),
            table.c.published_at < published_before,
        )
        .order_by(table.c.published_at)
        .limit(limit)
    )
    connection = await session.connection()
    return [
        SendResultKey(email_id, job_id, tenant_id, server_id)
        for email_id, job_id, tenant_id, server_id in (await connection.execute(query)).all()
        if job_id is not None and server_id is not None
    ]
