"""The dispatch loop: give due emails to servers that may send now, then publish their jobs.

Each email is reserved and marked `scheduled` in one transaction, and published after that
commit. A job whose publish failed or was never confirmed is published again once its lease
runs out, so a scheduler killed between commit and publish loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import domain, events, repository, suppression, unsubscribe
from services.scheduler.domain import RetryPolicy, WarmupSchedule
from shared.broker import Bus
from shared.db import in_transaction
from shared.messages import SCHEMA_VERSION
from shared.metrics import (
    JOBS_PUBLISHED,
    PUBLISH_CONFIRM_DURATION,
    RESERVATIONS_REFUSED,
    SCHEDULER_TICK_DURATION,
)
from shared.registry_read import tenant_servers
from shared.settings import SchedulerSettings
from shared.timeutil import utcnow

logger = logging.getLogger("abl.scheduler.dispatcher")

PUBLISH_BATCH = 5000
# Confirms outstanding at once: enough to keep the broker busy (its confirms come in batches),
# few enough that a publish failure costs little to redo.
PUBLISH_WINDOW = 256
# Tenants dispatched at once, each in its own transaction on its own connection: a tenant's
# dozen round trips leave the database idle between them, and another tenant's fill the gaps.
DISPATCH_CONCURRENCY = 4
# New warmup and day rows after which their tables' planner statistics are refreshed.
ANALYZE_AFTER_ROWS = 5000
# Bounds one tenant's transaction; what is left over goes in the next tick.
MAX_CLAIM_PER_TENANT = 20_000
# How often expired quota parks are cleared and announced.
UNPARK_EVERY = timedelta(seconds=30)


def _interleave(granted: dict[uuid.UUID, int]) -> list[uuid.UUID]:
    """Server ids in round-robin order, so the oldest emails are spread over all servers."""
    remaining = dict(granted)
    order: list[uuid.UUID] = []
    while remaining:
        for server_id in list(remaining):
            order.append(server_id)
            remaining[server_id] -= 1
            if remaining[server_id] == 0:
                del remaining[server_id]
    return order


def schedule_from(settings: SchedulerSettings) -> WarmupSchedule:
    return WarmupSchedule(
        first=settings.warmup_first,
        factor=settings.warmup_factor,
        cap=settings.warmup_cap,
        advance_ratio=settings.warmup_advance_ratio,
        idle_reset_days=settings.warmup_idle_reset_days,
        bounce_pause_ratio=settings.bounce_pause_ratio,
    )


def retry_policy_from(settings: SchedulerSettings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        base_seconds=settings.retry_base_seconds,
        cap_seconds=settings.retry_cap_seconds,
    )


# The fields as pydantic writes them when absent: the job's bytes match `SendJob`'s own dump.
NO_LINKS: dict[str, str | None] = {"unsubscribe_url": None, "unsubscribe_token": None}


@dataclass(frozen=True)
class UnsubscribeLinks:
    key: bytes
    public_url: str

    def for_row(self, row: Row[Any]) -> dict[str, str | None]:
        """The one-click link and its token, for an email that asked for them."""
        if not row.unsubscribe:
            return NO_LINKS
        token = unsubscribe.sign(self.key, row.id, row.tenant_id, row.to)
        return {
            "unsubscribe_url": unsubscribe.url(self.public_url, token),
            "unsubscribe_token": token,
        }


@dataclass(frozen=True, slots=True)
class Job:
    """A send job ready to publish: its body is a `SendJob` in JSON."""

    email_id: uuid.UUID
    job_id: uuid.UUID
    body: bytes


def _uuid_text(value: object) -> str:
    # asyncpg returns its own UUID class, which orjson does not know; uuid.UUID's it does.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} in a send job")


def encode_job(
    row: Row[Any],
    *,
    job_id: uuid.UUID,
    server_id: uuid.UUID,
    reserved_day: date,
    republished: bool = False,
    links: UnsubscribeLinks | None = None,
) -> Job:
    """The `SendJob` of a row of `repository.JOB_COLUMNS`, written with orjson.

    Measured (bench/encoding.py): building and dumping the pydantic model costs about 10x
    orjson on a dict, and a scheduler publishes millions a day. The schema stays pydantic's:
    a test parses these bytes with `SendJob` and compares them with its own dump.
    """
    body = orjson.dumps(
        {
            "version": SCHEMA_VERSION,
            "job_id": job_id,
            "email_id": row.id,
            "tenant_id": row.tenant_id,
            "server_id": server_id,
            "attempt": row.attempts + 1,
            "reserved_day": reserved_day.isoformat(),
            "content": {
                "to": row.to,
                "subject": row.subject,
                "text": row.text,
                "html": row.html,
                "reply_to": row.reply_to,
                "headers": row.headers,
                "message_id": row.message_id,
                "date": row.created_at,
                **(links.for_row(row) if links else NO_LINKS),
            },
            "not_before": None,
            "republished": republished,
        },
        default=_uuid_text,
        option=orjson.OPT_UTC_Z,  # "Z" for UTC, as pydantic writes it
    )
    return Job(row.id, job_id, body)


@dataclass
class TickReport:
    dispatched: int = 0
    republished: int = 0
    publish_failures: int = 0
    by_server: dict[uuid.UUID, int] = field(default_factory=dict)
    publish_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def dispatch_seconds(self) -> float:
        """Time spent computing allowances and reserving, without publishing."""
        return self.total_seconds - self.publish_seconds


class Dispatcher:
    def __init__(
        self,
        settings: SchedulerSettings,
        sessions: async_sessionmaker[AsyncSession],
        bus: Bus,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.bus = bus
        self.schedule = schedule_from(settings)
        self.rng = rng or random.Random()  # noqa: S311 - tie-breaking, not security
        self.lease = timedelta(seconds=settings.publish_lease_seconds)
        self.wake = asyncio.Event()
        self.links = UnsubscribeLinks(
            unsubscribe.keys_from(settings.unsubscribe_secrets).signing,
            settings.public_url,
        )
        # Rows created in warmup and day tables since their statistics were last refreshed.
        self.created_rows: Counter[str] = Counter()
        self.analyzed_rows: Counter[str] = Counter()
        self.unparked_at: datetime | None = None

    async def tick(self, now: datetime | None = None) -> TickReport:
        started = time.perf_counter()
        moment = now or utcnow()
        report = TickReport()
        await self._republish_expired(moment, report)
        if self.unparked_at is None or moment - self.unparked_at >= UNPARK_EVERY:
            await self.unpark(moment)
        async with self.sessions() as session:
            tenants = await repository.tenants_with_due_emails(session, moment)
        # Replicas start at different tenants instead of all queueing for the same locks.
        self.rng.shuffle(tenants)
        pending: list[Job] = []
        for start in range(0, len(tenants), DISPATCH_CONCURRENCY):
            group = tenants[start : start + DISPATCH_CONCURRENCY]
            for jobs in await asyncio.gather(
                *(self._dispatch_tenant(tenant_id, moment, report) for tenant_id in group)
            ):
                pending += jobs
            await self._refresh_statistics()
            if len(pending) >= PUBLISH_BATCH:
                await self._publish(pending, report)
                pending = []
        await self._publish(pending, report)
        report.total_seconds = time.perf_counter() - started
        SCHEDULER_TICK_DURATION.observe(report.total_seconds)
        return report

    async def unpark(self, now: datetime) -> None:
        """Clear the parks that are over and announce the quota parks' end (`active` again).
        Dispatch reads an expired park as none already; this is for the tenant, who learns
        the server is back without polling, within `UNPARK_EVERY`."""
        async with self.sessions() as session, session.begin():
            back = await repository.unpark_expired(session, now)
            await events.write(
                session, [events.unparked_event(p.tenant_id, p.server_id, now) for p in back]
            )
        self.unparked_at = now

    async def _refresh_statistics(self) -> None:
        # Each time a table has at least doubled (and by ANALYZE_AFTER_ROWS): a few ANALYZEs
        # while 100,000 servers' rows are created, none once they exist.
        grown = [
            table
            for table, n in self.created_rows.items()
            if n >= max(ANALYZE_AFTER_ROWS, self.analyzed_rows[table])
        ]
        if grown:
            async with self.sessions() as session, session.begin():
                await repository.refresh_statistics(session, grown)
            for table in grown:
                self.analyzed_rows[table] += self.created_rows.pop(table)

    async def _dispatch_tenant(
        self, tenant_id: uuid.UUID, now: datetime, report: TickReport
    ) -> list[Job]:
        """Reserve and mark one tenant's due emails in one transaction; return their jobs."""
        async with self.sessions() as session, session.begin():
            if not await repository.try_lock_tenant(session, tenant_id):
                return []  # another replica is dispatching this tenant right now
            window = await repository.sending_window(session, tenant_id)
            today = window.local_day(now)
            # Only servers that may send get warmup and allowance rows; `domain.eligible` then
            # decides among them (own tenant, active, not parked).
            servers = [s for s in await tenant_servers(session, tenant_id) if s.sendable]
            warmups = await repository.warmup_states(
                session, servers, today, self.schedule, created=self.created_rows, window=window
            )
            limits = {s.id: repository.limits_of(s, self.schedule) for s in servers}
            allowances = {
                s.id: self.schedule.allowance(warmups[s.id].step, limits[s.id].top) for s in servers
            }
            days = await repository.server_days(
                session, servers, today, allowances, created=self.created_rows
            )
            rolling = await repository.rolling_usage(session, [s.id for s in servers], now)
            candidates = [
                domain.Candidate(
                    str(s.id), str(s.tenant_id), s.sendable, warmups[s.id].parked_until
                )
                for s in servers
            ]
            eligible = set(domain.eligible(candidates, str(tenant_id), now))
            loads = [
                domain.ServerLoad(
                    str(s.id),
                    days[s.id].reserved,
                    min(
                        domain.sendable_now(
                            now=now,
                            window=window,
                            allowance=days[s.id].allowance,
                            used_today=days[s.id].reserved,
                            rolling_used=rolling.get(s.id, 0),
                            pacing=self.settings.pacing,
                            jitter_key=str(s.id),
                        ),
                        domain.minute_budget(warmups[s.id].pace_at, now, limits[s.id].per_minute),
                    ),
                )
                for s in servers
                if str(s.id) in eligible
            ]
            capacity = min(sum(load.can_take for load in loads), MAX_CLAIM_PER_TENANT)
            if capacity == 0:
                return []
            emails = await repository.claim_due(session, tenant_id, capacity, now)
            # Suppressed since it was queued (a bounce, an unsubscribe): never sent.
            emails = await suppression.drop_suppressed(session, tenant_id, emails, now)
            plan = domain.plan_share(loads, len(emails), self.rng)
            wanted = {uuid.UUID(server_id): n for server_id, n in plan.items()}
            granted = await repository.reserve_many(session, today, wanted, now)
            refused = sum(wanted.values()) - sum(granted.values())
            if refused:
                RESERVATIONS_REFUSED.inc(refused)
            paces = {
                server_id: domain.next_pace(warmups[server_id].pace_at, now, n, per_minute)
                for server_id, n in granted.items()
                if (per_minute := limits[server_id].per_minute) is not None
            }
            await repository.set_pace(session, paces)
            chosen = emails[: sum(granted.values())]
            assigned = domain.avoid_previous_server(
                [str(email.server_id) if email.server_id else None for email in chosen],
                [str(server_id) for server_id in _interleave(granted)],
            )
            assignments = [
                (email.id, uuid.UUID(server_id), uuid.uuid4())
                for email, server_id in zip(chosen, assigned, strict=True)
            ]
            hour = domain.hour_bucket(now)
            marked = await repository.mark_scheduled(
                session,
                assignments,
                day=today,
                hour=hour,
                lease_until=now + self.lease,
                now=now,
            )
            if len(marked) < len(assignments):
                # Canceled between the claim and the mark: their reservations go back.
                unmarked = Counter(s for e, s, _ in assignments if e not in marked)
                await repository.write_counters(
                    session,
                    days={(s, today): (n, 0) for s, n in unmarked.items()},
                    hours={(s, hour): n for s, n in unmarked.items()},
                )
            jobs = [
                encode_job(
                    email,
                    job_id=job_id,
                    server_id=server_id,
                    reserved_day=today,
                    links=self.links,
                )
                for email, (email_id, server_id, job_id) in zip(chosen, assignments, strict=True)
                if email_id in marked
            ]
        report.dispatched += len(jobs)
        for email_id, server_id, _ in assignments:
            if email_id in marked:
                report.by_server[server_id] = report.by_server.get(server_id, 0) + 1
        return jobs

    async def _republish_expired(self, now: datetime, report: TickReport) -> None:
        async with self.sessions() as session, session.begin():
            rows = await repository.renew_expired_leases(
                session, now, now + self.lease, limit=PUBLISH_BATCH
            )
            # The same job again: same job id, server, reserved day and attempt.
            jobs = [
                encode_job(
                    row,
                    job_id=row.job_id,
                    server_id=row.server_id,
                    reserved_day=row.reserved_day,
                    republished=True,
                    links=self.links,
                )
                for row in rows
            ]
        if jobs:
            logger.warning("publishing %d jobs again after their lease ran out", len(jobs))
        report.republished += len(jobs)
        await self._publish(jobs, report)

    async def _publish(self, jobs: Sequence[Job], report: TickReport) -> None:
        """Publish with up to PUBLISH_WINDOW confirms outstanding, then record the confirmed.

        `bus.publish` returns once its message is confirmed, so PUBLISH_WINDOW workers each
        publishing in turn keep that many confirms in flight, as a bare aio-pika loop with a
        semaphore does, without a task per job.
        """
        if not jobs:
            return
        started = time.perf_counter()
        queue = self.settings.send_jobs_queue
        confirmed: list[tuple[uuid.UUID, uuid.UUID]] = []
        failures = 0
        pending = iter(jobs)

        async def worker() -> None:
            nonlocal failures
            for job in pending:
                sent_at = time.perf_counter()
                try:
                    await self.bus.publish(
                        queue,
                        job.body,
                        message_id=str(job.job_id),
                        # A job left waiting this long is dead-lettered, and its email settled.
                        expires_in=self.settings.job_ttl_seconds,
                    )
                except Exception as exc:
                    failures += 1
                    logger.warning("publish of job %s failed: %s", job.job_id, type(exc).__name__)
                    continue
                PUBLISH_CONFIRM_DURATION.observe(time.perf_counter() - sent_at)
                confirmed.append((job.email_id, job.job_id))

        await asyncio.gather(*(worker() for _ in range(min(PUBLISH_WINDOW, len(jobs)))))
        report.publish_failures += failures
        JOBS_PUBLISHED.inc(len(confirmed))
        if confirmed:
            await in_transaction(
                self.sessions,
                lambda session: repository.mark_published(session, confirmed, utcnow()),
            )
        report.publish_seconds += time.perf_counter() - started

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop` is set; a new email wakes the loop early."""
        while not stop.is_set():
            # Cleared before the tick, so an email accepted during the tick starts the next one
            # at once instead of waiting a whole interval.
            self.wake.clear()
            try:
                await self.tick()
            except Exception:
                logger.exception("scheduler tick failed; trying again next tick")
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
            await asyncio.wait(
                waiters, timeout=self.settings.tick_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in waiters:
                waiter.cancel()
