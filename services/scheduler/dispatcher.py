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
from datetime import date, datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import domain, repository
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
from shared.settings import Settings
from shared.timeutil import utcnow

logger = logging.getLogger("abl.scheduler.dispatcher")


def schedule_from(settings: Settings) -> WarmupSchedule:
    return WarmupSchedule(
        first=settings.warmup_first,
        factor=settings.warmup_factor,
        cap=settings.warmup_cap,
        advance_ratio=settings.warmup_advance_ratio,
        idle_reset_days=settings.warmup_idle_reset_days,
    )


def retry_policy_from(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        base_seconds=settings.retry_base_seconds,
        cap_seconds=settings.retry_cap_seconds,
    )


def job_for(email: Email) -> SendJob:
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
        ),
    )


@dataclass
class TickReport:
    dispatched: int = 0
    republished: int = 0
    publish_failures: int = 0
    by_server: dict[uuid.UUID, int] = field(default_factory=dict)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
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

    async def tick(self, now: datetime | None = None) -> TickReport:
        started = time.perf_counter()
        moment = now or utcnow()
        report = TickReport()
        await self._republish_expired(moment, report)
        async with self.sessions() as session:
            tenants = await repository.tenants_with_due_emails(session, moment)
        for tenant_id in tenants:
            await self._dispatch_tenant(tenant_id, moment, report)
        SCHEDULER_TICK_DURATION.observe(time.perf_counter() - started)
        return report

    async def _dispatch_tenant(
        self, tenant_id: uuid.UUID, now: datetime, report: TickReport
    ) -> None:
        async with self.sessions() as session, session.begin():
            window = await repository.sending_window(session, tenant_id)
            today = window.local_day(now)
            servers = [s for s in await tenant_servers(session, tenant_id) if s.sendable]
            parked = await repository.parked_servers(session, tenant_id, now)
            due = await repository.due_count(session, tenant_id, now)
            loads = []
            for server in servers:
                warmup = await repository.warmup_state(session, server, today, self.schedule)
                allowance = self.schedule.allowance(warmup.step, server.daily_cap)
                day = await repository.server_day(session, server, today, allowance)
                if server.id in parked:
                    continue
                rolling = domain.rolling_used(
                    await repository.usage_by_hour(session, server.id, now), now
                )
                can_take = domain.sendable_now(
                    now=now,
                    window=window,
                    allowance=day.allowance,
                    used_today=day.reserved,
                    rolling_used=rolling,
                    pacing=self.settings.pacing,
                    jitter_key=str(server.id),
                )
                loads.append(domain.ServerLoad(str(server.id), day.reserved, can_take))
        plan = domain.plan_share(loads, due, self.rng)
        for server_id, wanted in plan.items():
            await self._dispatch_to_server(
                tenant_id, uuid.UUID(server_id), today, wanted, now, report
            )

    async def _dispatch_to_server(
        self,
        tenant_id: uuid.UUID,
        server_id: uuid.UUID,
        day: date,
        wanted: int,
        now: datetime,
        report: TickReport,
    ) -> None:
        async with self.sessions() as session, session.begin():
            emails = await repository.claim_due(session, tenant_id, wanted, now)
            if not emails:
                return
            granted = await repository.reserve(session, server_id, day, len(emails), now)
            if granted < len(emails):
                RESERVATIONS_REFUSED.inc(len(emails) - granted)
            chosen = emails[:granted]
            for email in chosen:
                email.status = EmailStatus.scheduled
                email.server_id = server_id
                email.job_id = uuid.uuid4()
                email.reserved_day = day
                email.reserved_hour = domain.hour_bucket(now)
                email.lease_until = now + self.lease
                email.published_at = None
                email.updated_at = now
                session.add(email)
            jobs = [job_for(email) for email in chosen]
        report.dispatched += len(jobs)
        report.by_server[server_id] = report.by_server.get(server_id, 0) + len(jobs)
        await self._publish(jobs, report)

    async def _republish_expired(self, now: datetime, report: TickReport) -> None:
        async with self.sessions() as session, session.begin():
            emails = await repository.expired_leases(session, now, limit=1000)
            for email in emails:
                email.lease_until = now + self.lease
                session.add(email)
            jobs = [job_for(email) for email in emails]
        if jobs:
            logger.warning("publishing %d jobs again after their lease ran out", len(jobs))
        report.republished += len(jobs)
        await self._publish(jobs, report)

    async def _publish(self, jobs: Sequence[SendJob], report: TickReport) -> None:
        if not jobs:
            return

        async def one(job: SendJob) -> tuple[uuid.UUID, uuid.UUID] | None:
            started = time.perf_counter()
            try:
                await self.bus.publish(
                    self.settings.send_jobs_queue,
                    job.model_dump_json().encode(),
                    message_id=str(job.job_id),
                )
            except Exception as exc:
                logger.warning("publish of job %s failed: %s", job.job_id, type(exc).__name__)
                return None
            PUBLISH_CONFIRM_DURATION.observe(time.perf_counter() - started)
            return job.email_id, job.job_id

        results = await asyncio.gather(*(one(job) for job in jobs))
        confirmed = [pair for pair in results if pair is not None]
        report.publish_failures += len(jobs) - len(confirmed)
        JOBS_PUBLISHED.inc(len(confirmed))
        if confirmed:
            async with self.sessions() as session, session.begin():
                await repository.mark_published(session, confirmed, utcnow())

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
