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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import domain, repository, suppression, unsubscribe
from services.scheduler.domain import RetryPolicy, WarmupSchedule
from services.scheduler.models import Email, EmailStatus
from shared.broker import Bus
from shared.messages import EmailContent, SendJob
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
PUBLISH_CONCURRENCY = 256
# Bounds one tenant's transaction; what is left over goes in the next tick.
MAX_CLAIM_PER_TENANT = 20_000


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
    )


def retry_policy_from(settings: SchedulerSettings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        base_seconds=settings.retry_base_seconds,
        cap_seconds=settings.retry_cap_seconds,
    )


@dataclass(frozen=True)
class UnsubscribeLinks:
    key: bytes
    public_url: str

    def for_email(self, email: Email) -> tuple[str, str] | tuple[None, None]:
        if not email.unsubscribe:
            return None, None
        token = unsubscribe.sign(self.key, email.id, email.tenant_id, email.to)
        return unsubscribe.url(self.public_url, token), token


def job_for(
    email: Email, *, republished: bool = False, links: UnsubscribeLinks | None = None
) -> SendJob:
    unsubscribe_url, unsubscribe_token = links.for_email(email) if links else (None, None)
    assert email.job_id is not None
    assert email.server_id is not None
    assert email.reserved_day is not None
    return SendJob(
        job_id=email.job_id,
        email_id=email.id,
        tenant_id=email.tenant_id,
        server_id=email.server_id,
        attempt=email.attempts + 1,
        reserved_day=email.reserved_day.isoformat(),
        content=EmailContent(
            to=email.to,
            subject=email.subject,
            text=email.text,
            html=email.html,
            reply_to=email.reply_to,
            headers=dict(email.headers),
            message_id=email.message_id,
            unsubscribe_url=unsubscribe_url,
            unsubscribe_token=unsubscribe_token,
        ),
        republished=republished,
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
            unsubscribe.derive_key(settings.internal_token.get_secret_value()),
            settings.public_url,
        )

    async def tick(self, now: datetime | None = None) -> TickReport:
        started = time.perf_counter()
        moment = now or utcnow()
        report = TickReport()
        await self._republish_expired(moment, report)
        async with self.sessions() as session:
            tenants = await repository.tenants_with_due_emails(session, moment)
        pending: list[SendJob] = []
        for tenant_id in tenants:
            pending += await self._dispatch_tenant(tenant_id, moment, report)
            if len(pending) >= PUBLISH_BATCH:
                await self._publish(pending, report)
                pending = []
        await self._publish(pending, report)
        report.total_seconds = time.perf_counter() - started
        SCHEDULER_TICK_DURATION.observe(report.total_seconds)
        return report

    async def _dispatch_tenant(
        self, tenant_id: uuid.UUID, now: datetime, report: TickReport
    ) -> list[SendJob]:
        """Reserve and mark one tenant's due emails in one transaction; return their jobs."""
        async with self.sessions() as session, session.begin():
            if not await repository.try_lock_tenant(session, tenant_id):
                return []  # another replica is dispatching this tenant right now
            window = await repository.sending_window(session, tenant_id)
            today = window.local_day(now)
            # Only servers that may send get warmup and allowance rows; `domain.eligible` then
            # decides among them (own tenant, active, not parked).
            servers = [s for s in await tenant_servers(session, tenant_id) if s.sendable]
            warmups = await repository.warmup_states(session, servers, today, self.schedule)
            limits = {s.id: repository.limits_of(s, self.schedule) for s in servers}
            allowances = {
                s.id: self.schedule.allowance(warmups[s.id].step, limits[s.id].top) for s in servers
            }
            days = await repository.server_days(session, servers, today, allowances)
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
            for server_id, n in granted.items():
                per_minute = limits[server_id].per_minute
                if per_minute is not None:
                    warmup = warmups[server_id]
                    warmup.pace_at = domain.next_pace(warmup.pace_at, now, n, per_minute)
                    session.add(warmup)
            chosen = emails[: sum(granted.values())]
            assigned = domain.avoid_previous_server(
                [str(email.server_id) if email.server_id else None for email in chosen],
                [str(server_id) for server_id in _interleave(granted)],
            )
            for email, server_id in zip(chosen, map(uuid.UUID, assigned), strict=True):
                email.status = EmailStatus.scheduled
                email.server_id = server_id
                email.job_id = uuid.uuid4()
                email.reserved_day = today
                email.reserved_hour = domain.hour_bucket(now)
                email.lease_until = now + self.lease
                email.published_at = None
                email.updated_at = now
                session.add(email)
            jobs = [job_for(email, links=self.links) for email in chosen]
        report.dispatched += len(jobs)
        for server_id, n in granted.items():
            report.by_server[server_id] = report.by_server.get(server_id, 0) + n
        return jobs

    async def _republish_expired(self, now: datetime, report: TickReport) -> None:
        async with self.sessions() as session, session.begin():
            emails = await repository.expired_leases(session, now, limit=PUBLISH_BATCH)
            for email in emails:
                email.lease_until = now + self.lease
                session.add(email)
            jobs = [job_for(email, republished=True, links=self.links) for email in emails]
        if jobs:
            logger.warning("publishing %d jobs again after their lease ran out", len(jobs))
        report.republished += len(jobs)
        await self._publish(jobs, report)

    async def _publish(self, jobs: Sequence[SendJob], report: TickReport) -> None:
        if not jobs:
            return
        started = time.perf_counter()
        slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)

        async def one(job: SendJob) -> tuple[uuid.UUID, uuid.UUID] | None:
            async with slots:
                sent_at = time.perf_counter()
                try:
                    await self.bus.publish(
                        self.settings.send_jobs_queue,
                        job.model_dump_json().encode(),
                        message_id=str(job.job_id),
                        # A job left waiting this long is dead-lettered, and its email settled.
                        expires_in=self.settings.job_ttl_seconds,
                    )
                except Exception as exc:
                    logger.warning("publish of job %s failed: %s", job.job_id, type(exc).__name__)
                    return None
                PUBLISH_CONFIRM_DURATION.observe(time.perf_counter() - sent_at)
                return job.email_id, job.job_id

        results = await asyncio.gather(*(one(job) for job in jobs))
        confirmed = [pair for pair in results if pair is not None]
        report.publish_failures += len(jobs) - len(confirmed)
        JOBS_PUBLISHED.inc(len(confirmed))
        if confirmed:
            async with self.sessions() as session, session.begin():
                await repository.mark_published(session, confirmed, utcnow())
        report.publish_seconds += time.perf_counter() - started

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop` is set; a new email wakes the loop early."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                logger.exception("scheduler tick failed; trying again next tick")
            self.wake.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
            await asyncio.wait(
                waiters, timeout=self.settings.tick_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in waiters:
                waiter.cancel()
