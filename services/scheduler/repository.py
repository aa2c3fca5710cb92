"""Data access of the scheduler: emails, warmup state, allowances and reservations."""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Date,
    Integer,
    Row,
    String,
    Table,
    Uuid,
    func,
    insert,
    text,
    true,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import TypeEngine
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import domain, events, lifecycle
from services.scheduler.domain import SendingWindow, WarmupSchedule
from services.scheduler.feedback import Kind
from services.scheduler.lifecycle import Step
from services.scheduler.models import (
    Email,
    EmailStatus,
    MailboxEvent,
    SendingProfile,
    ServerDay,
    ServerUsageHour,
    ServerWarmup,
)
from services.scheduler.registry_copy import ServerView
from shared.db import RowSet, among, insert_ignore, is_postgres, table_of, upsert_increment
from shared.errors import NotFound
from shared.timeutil import UtcDateTime, utcnow

_email_table = table_of(Email)


class SendResultKey(NamedTuple):
    """What names one attempt of one email, as a result event does."""

    email_id: uuid.UUID
    job_id: uuid.UUID
    tenant_id: uuid.UUID
    server_id: uuid.UUID


class EmailNotFound(NotFound):
    """No email with this id for this tenant."""

    code = "email_not_found"
    default_detail = "No email 01900000-0000-7000-8000-000000000000 for this tenant."
    hint = "List your emails with GET /v1/messages."


def email_not_found(email_id: uuid.UUID) -> NotFound:
    return EmailNotFound(f"No email {email_id} for this tenant.")


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


async def add_emails(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> bool:
    """Insert emails (rows of the emails table) in one multi-row INSERT; False when an
    idempotency key raced in from another request."""
    connection = await session.connection()
    try:
        # A savepoint: the batch goes in whole or not at all (SQLite's executemany would keep
        # the rows before the one that failed).
        async with connection.begin_nested():
            await connection.execute(insert(_email_table), list(rows))
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


async def sending_windows(
    session: AsyncSession, tenant_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, SendingWindow]:
    """Each tenant's sending window (the default for a tenant without a profile), one query."""
    p = table_of(SendingProfile)
    connection = await session.connection()
    rows = await connection.execute(
        sa_select(p.c.tenant_id, p.c.time_zone, p.c.start_hour, p.c.end_hour).where(
            p.c.tenant_id.in_(tenant_ids)
        )
    )
    found = {tenant_id: SendingWindow(zone, start, end) for tenant_id, zone, start, end in rows}
    return {tenant_id: found.get(tenant_id, SendingWindow()) for tenant_id in tenant_ids}


# --- warmup and allowances ----------------------------------------------------------------


def limits_of(server: ServerView, schedule: WarmupSchedule) -> domain.ServerLimits:
    return domain.server_limits(
        server.host, server.username, server.daily_cap, schedule, server.provider
    )


@dataclass(frozen=True, slots=True)
class WarmupRow:
    """A server's warmup state as the dispatcher reads it (no ORM object per server)."""

    server_id: uuid.UUID
    step: int
    state_day: date
    idle_days: int
    parked_until: datetime | None
    pace_at: datetime | None = None  # the next per-minute slot (domain.minute_budget)


@dataclass(frozen=True, slots=True)
class DayRow:
    """A server's counters on one day."""

    server_id: uuid.UUID
    allowance: int
    reserved: int
    sent: int


_warmup_table = table_of(ServerWarmup)
_day_table = table_of(ServerDay)


async def _warmup_rows(
    session: AsyncSession, server_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, WarmupRow]:
    t = _warmup_table
    query = sa_select(
        t.c.server_id, t.c.step, t.c.state_day, t.c.idle_days, t.c.parked_until, t.c.pace_at
    )
    connection = await session.connection()
    rows = await connection.execute(query.where(among(session, t.c.server_id, server_ids, Uuid())))
    return {row.server_id: WarmupRow(*row) for row in rows}


async def set_pace(session: AsyncSession, paces: dict[uuid.UUID, datetime]) -> None:
    """Record the next per-minute slot of servers whose provider limits sends per minute."""
    rows = RowSet(session, {"server_id": Uuid(), "pace_at": UtcDateTime()}, sorted(paces.items()))
    w = _warmup_table
    await rows.execute(
        session,
        update(w).where(w.c.server_id == rows.c["server_id"]).values(pace_at=rows.c["pace_at"]),
    )


async def warmup_states(
    session: AsyncSession,
    servers: Sequence[ServerView],
    today: date,
    schedule: WarmupSchedule,
    created: Counter[str] | None = None,
    window: SendingWindow | None = None,
) -> dict[uuid.UUID, WarmupRow]:
    """Each server's warmup row, folded forward to `today` (created fresh for a new server);
    `created` counts the rows inserted. `window` says where the tenant's days start (UTC
    without it), to count each day's hard bounces."""
    if not servers:
        return {}
    by_id = {server.id: server for server in servers}
    rows = await _warmup_rows(session, list(by_id))
    missing = [server for server in servers if server.id not in rows]
    if missing and created is not None:
        created["server_warmup"] += len(missing)
    if missing:
        await insert_ignore(
            session,
            _warmup_table,
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
        rows.update(await _warmup_rows(session, [s.id for s in missing]))
    stale = [row for row in rows.values() if row.state_day < today]
    if stale:
        d = _day_table
        connection = await session.connection()
        history = await connection.execute(
            sa_select(d.c.server_id, d.c.day, d.c.sent, d.c.allowance).where(
                among(session, d.c.server_id, [row.server_id for row in stale], Uuid()),
                d.c.day >= min(row.state_day for row in stale),
                d.c.day < today,
            )
        )
        delivered: dict[uuid.UUID, dict[date, int]] = {}
        allowances: dict[uuid.UUID, dict[date, int]] = {}
        for server_id, day, sent, allowance in history:
            delivered.setdefault(server_id, {})[day] = sent
            allowances.setdefault(server_id, {})[day] = allowance
        since = min(row.state_day for row in stale)
        bounced = await bounced_by_day(
            session, [row.server_id for row in stale], since, window or SendingWindow()
        )
        folded: list[tuple[uuid.UUID, int, date, int, date]] = []
        stepped: list[tuple[events.WarmupStep, int, date]] = []
        for row in stale:
            top = limits_of(by_id[row.server_id], schedule).top
            state = domain.state_on(
                domain.WarmupState(row.step, row.state_day, row.idle_days),
                today,
                delivered=delivered.get(row.server_id, {}),
                allowances=allowances.get(row.server_id, {}),
                schedule=schedule,
                daily_cap=top,
                bounced=bounced.get(row.server_id, {}),
            )
            if state.step > row.step:
                stepped.append(
                    (
                        events.WarmupStep(
                            server_id=row.server_id,
                            tenant_id=by_id[row.server_id].tenant_id,
                            day=today,
                            step=state.step,
                            previous_step=row.step,
                            allowance=schedule.allowance(state.step, top),
                            previous_allowance=schedule.allowance(row.step, top),
                            top_step=schedule.top_step(top),
                        ),
                        state.idle_days,
                        row.state_day,
                    )
                )
            else:
                folded.append(
                    (row.server_id, state.step, state.day, state.idle_days, row.state_day)
                )
            rows[row.server_id] = dataclasses.replace(
                row, step=state.step, state_day=state.day, idle_days=state.idle_days
            )
        w = _warmup_table
        values = RowSet(
            session,
            {
                "server_id": Uuid(),
                "step": Integer(),
                "day": Date(),
                "idle": Integer(),
                "old_day": Date(),
            },
            sorted(folded),
        )
        await values.execute(
            session,
            update(w)
            .where(w.c.server_id == values.c["server_id"], w.c.state_day == values.c["old_day"])
            .values(step=values.c["step"], state_day=values.c["day"], idle_days=values.c["idle"]),
        )
        await _record_steps(session, stepped)
    return rows


async def _record_steps(
    session: AsyncSession, stepped: list[tuple[events.WarmupStep, int, date]]
) -> None:
    """Write the step-ups and announce them (`server.warmup_step`), in the caller's
    transaction. Each row is updated only from the day it was read at, and announced only when
    that update took: two transactions folding the same day (the dispatcher and a GET of
    /warmup) announce it once. A step-up happens once per server and day at most."""
    w = _warmup_table
    announced = []
    for step, idle_days, old_day in sorted(stepped, key=lambda s: s[0].server_id):
        result = await session.exec(
            update(w)
            .where(w.c.server_id == step.server_id, w.c.state_day == old_day)
            .values(step=step.step, state_day=step.day, idle_days=idle_days)
        )
        if result.rowcount:
            announced.append(events.warmup_step_event(step, utcnow()))
    await events.write(session, announced)


async def warmup_state(
    session: AsyncSession,
    server: ServerView,
    today: date,
    schedule: WarmupSchedule,
    window: SendingWindow | None = None,
) -> WarmupRow:
    return (await warmup_states(session, [server], today, schedule, window=window))[server.id]


async def bounced_by_day(
    session: AsyncSession, server_ids: Sequence[uuid.UUID], since: date, window: SendingWindow
) -> dict[uuid.UUID, dict[date, int]]:
    """Each server's hard-bounced emails by the (tenant's) day they were sent, from `since`."""
    query = select(Email.server_id, Email.sent_at).where(
        col(Email.server_id).in_(server_ids),
        Email.status == EmailStatus.bounced,
        col(Email.sent_at) >= window.bounds(since)[0],
    )
    counts: dict[uuid.UUID, dict[date, int]] = {}
    for server_id, sent_at in (await session.exec(query)).all():
        if server_id is None or sent_at is None:
            continue
        day = window.local_day(sent_at)
        per_day = counts.setdefault(server_id, {})
        per_day[day] = per_day.get(day, 0) + 1
    return counts


# Emails that left: the bounce-rate guard's denominator.
LEFT = tuple(lifecycle.LEFT)


@dataclass(frozen=True)
class BounceCounts:
    """A server's last `sent` emails that left, and how many of them bounced hard or drew a
    complaint."""

    sent: int
    hard: int
    complaints: int


async def bounce_counts(session: AsyncSession, server_id: uuid.UUID, window: int) -> BounceCounts:
    query = (
        select(Email.id, Email.status)
        .where(Email.server_id == server_id, col(Email.status).in_(LEFT))
        .order_by(col(Email.sent_at).desc())
        .limit(window)
    )
    rows = (await session.exec(query)).all()
    ids = [email_id for email_id, _ in rows]
    hard = sum(1 for _, status in rows if status == EmailStatus.bounced)
    complaints = 0
    if ids:
        counted = await session.exec(
            select(func.count()).where(
                MailboxEvent.kind == Kind.complaint.value, col(MailboxEvent.email_id).in_(ids)
            )
        )
        complaints = int(counted.one())
    return BounceCounts(len(rows), hard, complaints)


async def server_days(
    session: AsyncSession,
    servers: Sequence[ServerView],
    day: date,
    allowances: dict[uuid.UUID, int],
    created: Counter[str] | None = None,
) -> dict[uuid.UUID, DayRow]:
    """Each server's counter row for `day`, created with that day's allowance when first needed.

    The allowance is fixed for the day once the row exists.
    """
    if not servers:
        return {}
    d = _day_table
    query = sa_select(d.c.server_id, d.c.allowance, d.c.reserved, d.c.sent).where(
        among(session, d.c.server_id, [s.id for s in servers], Uuid()), d.c.day == day
    )
    connection = await session.connection()
    rows = {row.server_id: DayRow(*row) for row in await connection.execute(query)}
    missing = [s for s in servers if s.id not in rows]
    if missing and created is not None:
        created["server_days"] += len(missing)
    if missing:
        await insert_ignore(
            session,
            d,
            [
                {
                    "server_id": s.id,
                    "day": day,
                    "tenant_id": s.tenant_id,
                    "allowance": allowances[s.id],
                    "reserved": 0,
                    "sent": 0,
                }
                for s in missing
            ],
        )
        query = sa_select(d.c.server_id, d.c.allowance, d.c.reserved, d.c.sent).where(
            among(session, d.c.server_id, [s.id for s in missing], Uuid()), d.c.day == day
        )
        rows.update({row.server_id: DayRow(*row) for row in await connection.execute(query)})
    return rows


async def server_day(
    session: AsyncSession, server: ServerView, day: date, allowance: int
) -> DayRow:
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
            among(session, hours.c.server_id, server_ids, Uuid()),
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
) -> dict[uuid.UUID, int]:
    """PostgreSQL: the same guard for many servers in one statement; returns who got it all,
    with the day's allowance of each."""
    table = table_of(ServerDay)
    wants = RowSet(session, {"server_id": Uuid(), "wanted": Integer()}, sorted(wanted.items()))
    statement = (
        update(table)
        .where(
            table.c.server_id == wants.c["server_id"],
            table.c.day == day,
            table.c.reserved + wants.c["wanted"] <= table.c.allowance,
        )
        .values(reserved=table.c.reserved + wants.c["wanted"])
        .returning(table.c.server_id, table.c.allowance)
    )
    return {
        server_id: allowance for server_id, allowance in await wants.execute(session, statement)
    }


async def reserve_many(
    session: AsyncSession, day: date, wanted: dict[uuid.UUID, int], now: datetime
) -> dict[uuid.UUID, int]:
    """Reserve sends on many servers' `day`; return what each was granted.

    After the daily guard has locked the servers' rows, the rolling 24-hour count is read: it
    sees every reservation committed before, and none can slip in until this one commits.
    """
    wanted = {server_id: n for server_id, n in wanted.items() if n > 0}
    granted: dict[uuid.UUID, int] = {}
    allowances: dict[uuid.UUID, int] = {}
    if wanted and is_postgres(session):
        allowances = await _reserve_daily_bulk(session, day, wanted)
        granted = {server_id: wanted[server_id] for server_id in allowances}
    for server_id, n in sorted(wanted.items()):
        if server_id not in granted:
            granted[server_id] = await _reserve_daily(session, server_id, day, n)
    granted = {server_id: n for server_id, n in granted.items() if n > 0}
    if not granted:
        return {}
    missing = [server_id for server_id in granted if server_id not in allowances]
    if missing:
        d = _day_table
        connection = await session.connection()
        rows = await connection.execute(
            sa_select(d.c.server_id, d.c.allowance).where(
                among(session, d.c.server_id, missing, Uuid()), d.c.day == day
            )
        )
        allowances.update({server_id: allowance for server_id, allowance in rows})
    rolling = await rolling_usage(session, list(granted), now)
    table = table_of(ServerDay)
    for server_id, n in list(granted.items()):
        excess = max(0, rolling.get(server_id, 0) + n - allowances[server_id])
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
        await upsert_increment(
            session,
            table_of(ServerUsageHour),
            [
                {"server_id": server_id, "hour": hour, "used": n}
                for server_id, n in sorted(amounts.items())
            ],
            keys=("server_id", "hour"),
            column="used",
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


async def write_counters(
    session: AsyncSession,
    *,
    days: dict[tuple[uuid.UUID, date], tuple[int, int]],
    hours: dict[tuple[uuid.UUID, datetime], int],
) -> None:
    """Give reservations back and count deliveries for many servers, a few statements in all.

    `days` maps (server, day) to (reservations given back, emails delivered); `hours` maps
    (server, hour bucket) to reservations given back. Counters never go below 0. The rows are
    locked in key order first, so two batches (or a dispatcher) touching the same servers wait
    for each other instead of deadlocking.
    """
    day_table = table_of(ServerDay)
    hour_table = table_of(ServerUsageHour)
    if days:
        day_rows = await _locked_rows(
            session,
            day_table,
            {"server_id": Uuid(), "day": Date(), "released": Integer(), "delivered": Integer()},
            [(server_id, day, *days[(server_id, day)]) for server_id, day in sorted(days)],
        )
        await day_rows.execute(
            session,
            update(day_table)
            .where(
                day_table.c.server_id == day_rows.c["server_id"],
                day_table.c.day == day_rows.c["day"],
            )
            .values(
                reserved=_at_least_zero(session, day_table.c.reserved - day_rows.c["released"]),
                sent=day_table.c.sent + day_rows.c["delivered"],
            ),
        )
    if hours:
        hour_rows = await _locked_rows(
            session,
            hour_table,
            {"server_id": Uuid(), "hour": UtcDateTime(), "released": Integer()},
            [(server_id, hour, hours[(server_id, hour)]) for server_id, hour in sorted(hours)],
        )
        await hour_rows.execute(
            session,
            update(hour_table)
            .where(
                hour_table.c.server_id == hour_rows.c["server_id"],
                hour_table.c.hour == hour_rows.c["hour"],
            )
            .values(used=_at_least_zero(session, hour_table.c.used - hour_rows.c["released"])),
        )


async def _locked_rows(
    session: AsyncSession,
    table: Table,
    columns: dict[str, TypeEngine[Any]],
    rows: list[tuple[Any, ...]],
) -> RowSet:
    """The rows of a counter update, after locking the counters they touch in key order.

    The first two columns are the counter table's key (server, bucket); `rows` come sorted by
    them, so that every writer locks in the same order.
    """
    if is_postgres(session):
        server_key, bucket_key = list(columns)[:2]
        await (await session.connection()).execute(
            sa_select(table.c[server_key])
            .where(
                table.c[server_key].in_({row[0] for row in rows}),
                table.c[bucket_key].in_({row[1] for row in rows}),
            )
            .order_by(table.c[server_key], table.c[bucket_key])
            .with_for_update()
        )
    return RowSet(session, columns, rows)


# The park_reason of a server its provider refused for quota: parked until its next day.
QUOTA_PARK = "quota"


class Parked(NamedTuple):
    server_id: uuid.UUID
    tenant_id: uuid.UUID
    until: datetime
    reason: str


async def park_many(
    session: AsyncSession, parks: dict[uuid.UUID, tuple[datetime, str]], now: datetime
) -> list[Parked]:
    """Park servers until the given times, in server order (see `write_counters`); returns
    those that were not parked already (a park announced once, not once per refused email).
    Their rows are locked first, so two replicas applying results agree on which was first."""
    table = table_of(ServerWarmup)
    query = (
        sa_select(table.c.server_id, table.c.tenant_id, table.c.parked_until)
        .where(table.c.server_id.in_(sorted(parks)))
        .order_by(table.c.server_id)
    )
    if is_postgres(session):
        query = query.with_for_update()
    connection = await session.connection()
    before = (await connection.execute(query)).all()
    rows = RowSet(
        session,
        {"server_id": Uuid(), "until": UtcDateTime(), "reason": String()},
        [(server_id, until, reason[:200]) for server_id, (until, reason) in sorted(parks.items())],
    )
    await rows.execute(
        session,
        update(table)
        .where(table.c.server_id == rows.c["server_id"])
        .values(parked_until=rows.c["until"], park_reason=rows.c["reason"]),
    )
    return [
        Parked(server_id, tenant_id, *parks[server_id])
        for server_id, tenant_id, until in before
        if until is None or until <= now
    ]


async def unpark_expired(session: AsyncSession, now: datetime) -> list[Parked]:
    """Clear every park that is over; returns the quota parks this transaction cleared (each
    row is cleared from the value it was read with, so two replicas announce it once)."""
    table = table_of(ServerWarmup)
    connection = await session.connection()
    expired = await connection.execute(
        sa_select(table.c.server_id, table.c.tenant_id, table.c.parked_until, table.c.park_reason)
        .where(table.c.parked_until <= now)
        .order_by(table.c.server_id)
    )
    cleared = []
    for server_id, tenant_id, until, reason in expired.all():
        result = await session.exec(
            update(table)
            .where(table.c.server_id == server_id, table.c.parked_until == until)
            .values(parked_until=None, park_reason=None)
        )
        if result.rowcount and reason == QUOTA_PARK:
            cleared.append(Parked(server_id, tenant_id, until, reason))
    return cleared


# The columns the result applier decides from.
RESULT_COLUMNS = (
    _email_table.c.id,
    _email_table.c.tenant_id,
    _email_table.c.job_id,
    _email_table.c.status,
    _email_table.c.attempts,
    _email_table.c.reserved_day,
    _email_table.c.reserved_hour,
    _email_table.c.not_before,
    _email_table.c.sent_at,
    _email_table.c.campaign,
)


async def emails_for_results(session: AsyncSession, email_ids: set[uuid.UUID]) -> Sequence[Any]:
    """Rows of RESULT_COLUMNS, locked until commit on PostgreSQL (in id order)."""
    query = (
        sa_select(*RESULT_COLUMNS)
        .where(among(session, _email_table.c.id, sorted(email_ids), Uuid()))
        .order_by(_email_table.c.id)
    )
    if is_postgres(session):
        query = query.with_for_update()
    return (await (await session.connection()).execute(query)).all()


async def update_results(
    session: AsyncSession, rows: Sequence[tuple[Any, ...]], now: datetime
) -> None:
    """Write the outcome of many emails in one statement: rows of (id, status, attempts,
    not_before, job_id, last_smtp_code, last_smtp_reply, sent_at)."""
    values = RowSet(
        session,
        {
            "id": Uuid(),
            "status": String(),
            "attempts": Integer(),
            "not_before": UtcDateTime(),
            "job_id": Uuid(),
            "code": Integer(),
            "reply": String(),
            "sent_at": UtcDateTime(),
        },
        rows,
    )
    await values.execute(
        session,
        update(_email_table)
        .where(_email_table.c.id == values.c["id"])
        .values(
            status=values.c["status"],
            attempts=values.c["attempts"],
            not_before=values.c["not_before"],
            job_id=values.c["job_id"],
            last_smtp_code=values.c["code"],
            last_smtp_reply=values.c["reply"],
            sent_at=values.c["sent_at"],
            updated_at=now,
        ),
    )


# --- dispatch -----------------------------------------------------------------------------


async def tenants_with_due_emails(session: AsyncSession, now: datetime) -> list[uuid.UUID]:
    query = (
        select(Email.tenant_id)
        .where(Email.status == EmailStatus.queued, col(Email.not_before) <= now)
        .distinct()
    )
    return list((await session.exec(query)).all())


# The columns a send job is built from; no ORM object per email on the dispatch path.
_email = _email_table
JOB_COLUMNS = (
    _email.c.id,
    _email.c.tenant_id,
    _email.c.server_id,
    _email.c.attempts,
    _email.c.to,
    _email.c.subject,
    _email.c.text,
    _email.c.html,
    _email.c.reply_to,
    _email.c.headers,
    _email.c.message_id,
    _email.c.created_at,
    _email.c.unsubscribe,
)


def _due(query: Any, now: datetime) -> Any:
    return query.where(
        _email.c.status == lifecycle.source(Step.dispatch), _email.c.not_before <= now
    ).order_by(_email.c.id)


async def claim_due(
    session: AsyncSession, limits: dict[uuid.UUID, int], now: datetime, total: int
) -> Sequence[Any]:
    """Each tenant's oldest due emails, up to its limit and `total` in all, as rows of
    JOB_COLUMNS. Tenants are taken in the order of `limits` (the dispatcher shuffles them each
    tick), so the ones past `total`, left for the next tick, are not always the same.

    PostgreSQL: one statement for every tenant, a LATERAL join that walks each tenant's part of
    the (tenant, status, id) index only as far as its limit. SQLite: one query per tenant.
    Nothing is locked here: `mark_scheduled` is guarded by the status, so an email canceled or
    taken meanwhile is simply not marked (and the per-tenant advisory lock keeps replicas off
    each other's emails anyway). A row lock would cost a write per email.
    """
    wanted = [(tenant_id, n) for tenant_id, n in limits.items() if n > 0]
    if not wanted:
        return []
    connection = await session.connection()
    if is_postgres(session):
        v = RowSet(session, {"tenant_id": Uuid(), "n": Integer()}, wanted)
        picked = (
            _due(sa_select(*JOB_COLUMNS).where(_email.c.tenant_id == v.c["tenant_id"]), now)
            .limit(v.c["n"])
            .lateral("picked")
        )
        query = sa_select(picked).select_from(v.source.join(picked, true())).limit(total)
        return (await connection.execute(query)).all()
    rows: list[Any] = []
    for tenant_id, n in wanted:
        if len(rows) >= total:
            break
        query = _due(sa_select(*JOB_COLUMNS).where(_email.c.tenant_id == tenant_id), now)
        rows += (await connection.execute(query.limit(min(n, total - len(rows))))).all()
    return rows


async def mark_scheduled(
    session: AsyncSession,
    assignments: Sequence[tuple[uuid.UUID, uuid.UUID, uuid.UUID]],
    *,
    day: date,
    hour: datetime,
    lease_until: datetime,
    now: datetime,
) -> set[uuid.UUID]:
    """Mark (email id, server id, job id) scheduled in one statement; return the ids marked.

    Only emails still `queued` are marked (a cancel may have come in between).
    """
    if not assignments:
        return set()
    rows = RowSet(session, {"id": Uuid(), "server_id": Uuid(), "job_id": Uuid()}, assignments)
    statement = (
        update(_email)
        .where(_email.c.id == rows.c["id"], _email.c.status == lifecycle.source(Step.dispatch))
        .values(
            status=lifecycle.target(Step.dispatch),
            server_id=rows.c["server_id"],
            job_id=rows.c["job_id"],
            reserved_day=day,
            reserved_hour=hour,
            lease_until=lease_until,
            published_at=None,
            updated_at=now,
        )
    )
    # The count tells whether every email was marked (the common case), without sending back
    # an id per email; only when some were not are the marked ones looked up, by key.
    result = await rows.execute(session, statement)
    if result.rowcount == len(assignments):
        return {email_id for email_id, _, _ in assignments}
    query = sa_select(_email.c.id).where(
        among(session, _email.c.id, [email_id for email_id, _, _ in assignments], Uuid()),
        among(session, _email.c.job_id, [job_id for _, _, job_id in assignments], Uuid()),
    )
    return set((await (await session.connection()).execute(query)).scalars().all())


async def renew_expired_leases(
    session: AsyncSession, now: datetime, until: datetime, limit: int
) -> Sequence[Row[Any]]:
    """Scheduled emails whose job was never confirmed and whose lease ran out: their lease is
    renewed in the same statement, and their rows come back (JOB_COLUMNS and the attempt's)."""
    expired = (
        sa_select(_email.c.id)
        .where(
            _email.c.status == EmailStatus.scheduled,
            _email.c.published_at.is_(None),
            _email.c.lease_until < now,
        )
        .order_by(_email.c.id)
        .limit(limit)
    )
    if is_postgres(session):
        expired = expired.with_for_update(skip_locked=True)
    statement = (
        update(_email)
        .where(_email.c.id.in_(expired.scalar_subquery()))
        .values(lease_until=until)
        .returning(*JOB_COLUMNS, _email.c.job_id, _email.c.reserved_day)
    )
    return (await (await session.connection()).execute(statement)).all()


async def mark_published(
    session: AsyncSession, jobs: Sequence[tuple[uuid.UUID, uuid.UUID]], now: datetime
) -> None:
    """Record the broker's confirm of (email id, job id) pairs, in one statement."""
    rows = RowSet(session, {"email": Uuid(), "job": Uuid()}, jobs)
    await rows.execute(
        session,
        update(_email)
        .where(
            _email.c.id == rows.c["email"],
            _email.c.job_id == rows.c["job"],
            _email.c.published_at.is_(None),
        )
        .values(published_at=now),
    )


async def refresh_statistics(session: AsyncSession, tables: Sequence[str]) -> None:
    """PostgreSQL: ANALYZE tables that just grew a lot.

    The first tick over many new servers fills server_warmup and server_days from empty; until
    autovacuum analyzes them, the planner still believes they are empty and scans them whole
    for each tenant (measured: 10x the dispatch time at 100,000 fresh servers).
    """
    if is_postgres(session):
        for table in tables:
            if table in ("server_warmup", "server_days", "server_usage_hours"):
                await session.exec(text(f"ANALYZE {table}"))  # type: ignore[call-overload]


async def try_lock_tenants(
    session: AsyncSession, tenant_ids: Sequence[uuid.UUID]
) -> list[uuid.UUID]:
    """The tenants of these this transaction now dispatches alone (PostgreSQL advisory locks,
    tried in one statement, held until commit); the others are another replica's right now.

    The allowance guard is what keeps the cap; these locks keep replicas from contending for
    the same servers' rows, and keep the even share exact.
    """
    if not is_postgres(session):
        return list(tenant_ids)  # SQLite has a single writer already
    by_key = {int.from_bytes(t.bytes[:8], "big", signed=True): t for t in tenant_ids}
    keys = RowSet(session, {"k": BigInteger()}, [(key,) for key in sorted(by_key)])
    query = sa_select(keys.c["k"]).where(func.pg_try_advisory_xact_lock(keys.c["k"]))
    locked = (await keys.execute(session, query)).scalars().all()
    return [by_key[key] for key in sorted(locked)]


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


async def cancel_email(
    session: AsyncSession, tenant_id: uuid.UUID, email_id: uuid.UUID, now: datetime
) -> tuple[str, uuid.UUID | None] | None:
    """Cancel a queued or scheduled email with one guarded statement each, so a dispatch
    running at the same moment cannot be overwritten: (the status it had, its job id), or None
    when it was in neither state. A scheduled email keeps its reservation: its job is out, and
    the attempt's result (or the sender's "canceled before sending") gives it back."""
    table = table_of(Email)
    connection = await session.connection()
    for status in lifecycle.sources(Step.cancel):
        row = (
            await connection.execute(
                update(table)
                .where(
                    table.c.id == email_id,
                    table.c.tenant_id == tenant_id,
                    table.c.status == status,
                )
                .values(status=lifecycle.target(Step.cancel), updated_at=now)
                .returning(table.c.job_id)
            )
        ).first()
        if row is not None:
            return status, row[0]
    return None
