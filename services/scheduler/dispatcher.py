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
from services.scheduler.domain import RetryPolicy, SendingWindow, WarmupSchedule
from services.scheduler.registry_copy import ServerView, servers_of_tenants
from shared.broker import Bus
from shared.db import in_transaction
from shared.messages import SCHEMA_VERSION
from shared.metrics import (
    JOBS_PUBLISHED,
    PUBLISH_CONFIRM_DURATION,
    RESERVATIONS_REFUSED,
    SCHEDULER_TICK_DURATION,
)
from shared.settings import SchedulerSettings
from shared.timeutil import utcnow

logger = logging.getLogger("abl.scheduler.dispatcher")

PUBLISH_BATCH = 5000
# Confirms outstanding at once: enough to keep the broker busy (its confirms come in batches),
# few enough that a publish failure costs little to redo.
PUBLISH_WINDOW = 256
# Tenants dispatched together in one transaction, each statement covering all of them: a
# tenant alone costs a dozen round trips for a few hundred emails (measured: 16 statements per
# tenant made reserve + mark 6.6x one bulk UPDATE of the same rows).
TENANTS_PER_TRANSACTION = 50
# Such transactions at once, each on its own connection: one's round trips leave the database
# idle, another's fill the gaps.
DISPATCH_CONCURRENCY = 2
# New warmup and day rows after which their tables' planner statistics are refreshed.
ANALYZE_AFTER_ROWS = 5000
# Bounds one transaction's claim; what is left over goes in the next tick.
MAX_CLAIM_PER_TRANSACTION = 20_000
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


def _by_tenant(servers: list[ServerView]) -> dict[uuid.UUID, list[ServerView]]:
    grouped: dict[uuid.UUID, list[ServerView]] = {}
    for server in servers:
        grouped.setdefault(server.tenant_id, []).append(server)
    return grouped


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
    """A send job to publish: a row of `repository.JOB_COLUMNS` and the attempt it was given.

    Its body is written by the publisher just before it goes out (`encode_job`), so encoding
    overlaps the wait for the broker's confirms instead of holding up the dispatch
    transaction, and a batch keeps rows rather than rows and bodies.
    """

    row: Row[Any]
    job_id: uuid.UUID
    server_id: uuid.UUID
    reserved_day: date
    republished: bool = False

    @property
    def email_id(self) -> uuid.UUID:
        return self.row.id  # type: ignore[no-any-return]


def _uuid_text(value: object) -> str:
    # asyncpg returns its own UUID class, which orjson does not know; uuid.UUID's it does.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} in a send job")


def encode_job(job: Job, links: UnsubscribeLinks | None = None) -> bytes:
    """The job's `SendJob` in JSON, written with orjson.

    Measured (bench/encoding.py): building and dumping the pydantic model costs about 10x
    orjson on a dict, and a scheduler publishes millions a day. The schema stays pydantic's:
    a test parses these bytes with `SendJob` and compares them with its own dump.
    """
    row = job.row
    return orjson.dumps(
        {
            "version": SCHEMA_VERSION,
            "job_id": job.job_id,
            "email_id": row.id,
            "tenant_id": row.tenant_id,
            "server_id": job.server_id,
            "attempt": row.attempts + 1,
            "reserved_day": job.reserved_day.isoformat(),
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
            "republished": job.republished,
        },
        default=_uuid_text,
        option=orjson.OPT_UTC_Z,  # "Z" for UTC, as pydantic writes it
    )


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
        groups = [
            tenants[start : start + TENANTS_PER_TRANSACTION]
            for start in range(0, len(tenants), TENANTS_PER_TRANSACTION)
        ]
        pending: list[Job] = []
        for start in range(0, len(groups), DISPATCH_CONCURRENCY):
            for jobs in await asyncio.gather(
                *(
                    self._dispatch_group(group, moment, report)
                    for group in groups[start : start + DISPATCH_CONCURRENCY]
                )
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

    async def _dispatch_group(
        self, tenant_ids: list[uuid.UUID], now: datetime, report: TickReport
    ) -> list[Job]:
        """Reserve and mark the due emails of several tenants in one transaction, a few
        statements for all of them; return their jobs.

        Each tenant keeps its own share (its servers, its window, its even spread): only the
        round trips are shared. Tenants in different time zones may be on different local
        days, so the day-keyed steps run once per distinct day (one or two).
        """
        async with self.sessions() as session, session.begin():
            # Those another replica is dispatching right now are left to it.
            tenant_ids = await repository.try_lock_tenants(session, tenant_ids)
            if not tenant_ids:
                return []
            windows = await repository.sending_windows(session, tenant_ids)
            today_of = {tenant_id: windows[tenant_id].local_day(now) for tenant_id in tenant_ids}
            # Only servers that may send get warmup and allowance rows; `domain.eligible` then
            # decides among them (own tenant, active, not parked).
            servers = [s for s in await servers_of_tenants(session, tenant_ids) if s.sendable]
            # Warmup and day rows are read per local day and window (one or two groups): the
            # window places each day's bounces, the day keys the counters.
            by_day: dict[tuple[date, SendingWindow], list[ServerView]] = {}
            for server in servers:
                window = windows[server.tenant_id]
                by_day.setdefault((today_of[server.tenant_id], window), []).append(server)
            limits = {s.id: repository.limits_of(s, self.schedule) for s in servers}
            warmups: dict[uuid.UUID, repository.WarmupRow] = {}
            days: dict[uuid.UUID, repository.DayRow] = {}
            for (day, window), on_day in by_day.items():
                warmups |= await repository.warmup_states(
                    session, on_day, day, self.schedule, created=self.created_rows, window=window
                )
                allowances = {
                    s.id: self.schedule.allowance(warmups[s.id].step, limits[s.id].top)
                    for s in on_day
                }
                days |= await repository.server_days(
                    session, on_day, day, allowances, created=self.created_rows
                )
            rolling = await repository.rolling_usage(session, [s.id for s in servers], now)
            loads: dict[uuid.UUID, list[domain.ServerLoad]] = {t: [] for t in tenant_ids}
            for tenant_id, own_servers in _by_tenant(servers).items():
                candidates = [
                    domain.Candidate(
                        str(s.id), str(s.tenant_id), s.sendable, warmups[s.id].parked_until
                    )
                    for s in own_servers
                ]
                eligible = set(domain.eligible(candidates, str(tenant_id), now))
                loads[tenant_id] = [
                    domain.ServerLoad(
                        str(s.id),
                        days[s.id].reserved,
                        min(
                            domain.sendable_now(
                                now=now,
                                window=windows[tenant_id],
                                allowance=days[s.id].allowance,
                                used_today=days[s.id].reserved,
                                rolling_used=rolling.get(s.id, 0),
                                pacing=self.settings.pacing,
                                jitter_key=str(s.id),
                            ),
                            domain.minute_budget(
                                warmups[s.id].pace_at, now, limits[s.id].per_minute
                            ),
                        ),
                    )
                    for s in own_servers
                    if str(s.id) in eligible
                ]
            capacities = {t: sum(load.can_take for load in loads[t]) for t in tenant_ids}
            claimed = await repository.claim_due(
                session, capacities, now, MAX_CLAIM_PER_TRANSACTION
            )
            # Suppressed since it was queued (a bounce, an unsubscribe): never sent.
            claimed = await suppression.drop_suppressed(session, claimed, now)
            emails_of: dict[uuid.UUID, list[Row[Any]]] = {}
            for email in claimed:
                emails_of.setdefault(email.tenant_id, []).append(email)
            wanted: dict[date, dict[uuid.UUID, int]] = {}
            for tenant_id, emails in emails_of.items():
                plan = domain.plan_share(loads[tenant_id], len(emails), self.rng)
                wanted.setdefault(today_of[tenant_id], {}).update(
                    {uuid.UUID(server_id): n for server_id, n in plan.items()}
                )
            granted: dict[uuid.UUID, int] = {}
            for day, on_day_wanted in wanted.items():
                granted |= await repository.reserve_many(session, day, on_day_wanted, now)
            refused = sum(sum(w.values()) for w in wanted.values()) - sum(granted.values())
            if refused:
                RESERVATIONS_REFUSED.inc(refused)
            paces = {
                server_id: domain.next_pace(warmups[server_id].pace_at, now, n, per_minute)
                for server_id, n in granted.items()
                if (per_minute := limits[server_id].per_minute) is not None
            }
            await repository.set_pace(session, paces)
            tenant_of = {s.id: s.tenant_id for s in servers}
            granted_of: dict[uuid.UUID, dict[uuid.UUID, int]] = {}
            for server_id, n in granted.items():
                granted_of.setdefault(tenant_of[server_id], {})[server_id] = n
            # (email row, server id, job id) of every email given a server, by local day.
            assigned_on: dict[date, list[tuple[Row[Any], uuid.UUID, uuid.UUID]]] = {}
            for tenant_id, emails in emails_of.items():
                tenant_granted = granted_of.get(tenant_id, {})
                chosen = emails[: sum(tenant_granted.values())]
                picks = domain.avoid_previous_server(
                    [email.server_id for email in chosen], _interleave(tenant_granted)
                )
                assigned_on.setdefault(today_of[tenant_id], []).extend(
                    (email, server_id, uuid.uuid4())
                    for email, server_id in zip(chosen, picks, strict=True)
                )
            hour = domain.hour_bucket(now)
            jobs: list[Job] = []
            for day, assigned in assigned_on.items():
                jobs += await self._mark(session, assigned, day, hour, now, report)
        report.dispatched += len(jobs)
        return jobs

    async def _mark(
        self,
        session: AsyncSession,
        assigned: list[tuple[Row[Any], uuid.UUID, uuid.UUID]],
        day: date,
        hour: datetime,
        now: datetime,
        report: TickReport,
    ) -> list[Job]:
        """Mark emails of one local day scheduled; give back the reservations of those canceled
        meanwhile; return the jobs of the marked."""
        marked = await repository.mark_scheduled(
            session,
            [(email.id, server_id, job_id) for email, server_id, job_id in assigned],
            day=day,
            hour=hour,
            lease_until=now + self.lease,
            now=now,
        )
        if len(marked) < len(assigned):
            # Canceled between the claim and the mark: their reservations go back.
            unmarked = Counter(s for email, s, _ in assigned if email.id not in marked)
            await repository.write_counters(
                session,
                days={(s, day): (n, 0) for s, n in unmarked.items()},
                hours={(s, hour): n for s, n in unmarked.items()},
            )
        jobs = [
            Job(email, job_id, server_id, day)
            for email, server_id, job_id in assigned
            if email.id in marked
        ]
        for server_id, n in Counter(job.server_id for job in jobs).items():
            report.by_server[server_id] = report.by_server.get(server_id, 0) + n
        return jobs

    async def _republish_expired(self, now: datetime, report: TickReport) -> None:
        async with self.sessions() as session, session.begin():
            rows = await repository.renew_expired_leases(
                session, now, now + self.lease, limit=PUBLISH_BATCH
            )
            # The same job again: same job id, server, reserved day and attempt.
            jobs = [
                Job(row, row.job_id, row.server_id, row.reserved_day, republished=True)
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
                body = encode_job(job, self.links)
                sent_at = time.perf_counter()
                try:
                    await self.bus.publish(
                        queue,
                        body,
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
