"""Refreshes the state gauges: emails by status, servers by status and warmup step, queue depth.

Run by one loop per scheduler replica; every replica reports the same figures, so dashboards
take `max` over replicas rather than `sum`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from sqlalchemy import func
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler.models import Email, EmailStatus, ServerWarmup
from services.scheduler.registry_copy import server_status_counts
from shared.broker import Bus, queue_kind
from shared.metrics import (
    BROKER_QUEUE_MESSAGES,
    EMAILS_BY_STATUS,
    SERVERS_BY_STATUS,
    SERVERS_BY_STEP,
)
from shared.settings import SchedulerSettings
from shared.timeutil import utcnow

logger = logging.getLogger("abl.scheduler.stats")
STEPS = range(1, 15)


async def refresh(
    sessions: async_sessionmaker[AsyncSession], bus: Bus, settings: SchedulerSettings, now: datetime
) -> None:
    async with sessions() as session:
        rows = (
            await session.exec(select(Email.status, func.count()).group_by(col(Email.status)))
        ).all()
        by_status = {str(status): int(count) for status, count in rows}
        for email_status in EmailStatus:
            EMAILS_BY_STATUS.labels(email_status.value).set(by_status.get(email_status.value, 0))
        servers = await server_status_counts(session)
        parked = (
            await session.exec(select(func.count()).where(col(ServerWarmup.parked_until) > now))
        ).one()
        for status in (
            "active",
            "paused",
            "paused_bounces",
            "auth_failed",
            "tls_failed",
            "connect_failed",
            "timeout",
            "blocked_host",
            "protocol_error",
        ):
            SERVERS_BY_STATUS.labels(status).set(servers.get(status, 0))
        SERVERS_BY_STATUS.labels("parked").set(int(parked))
        steps = dict(
            (
                await session.exec(
                    select(ServerWarmup.step, func.count()).group_by(col(ServerWarmup.step))
                )
            ).all()
        )
        for step in STEPS:
            SERVERS_BY_STEP.labels(str(step)).set(steps.get(step, 0))
    for queue in (settings.send_jobs_queue, settings.results_queue):
        BROKER_QUEUE_MESSAGES.labels(queue_kind(queue)).set(await bus.depth(queue))


async def run(
    sessions: async_sessionmaker[AsyncSession],
    bus: Bus,
    settings: SchedulerSettings,
    stop: asyncio.Event,
    interval: float = 15.0,
) -> None:
    while not stop.is_set():
        try:
            await refresh(sessions, bus, settings, utcnow())
        except Exception:
            logger.exception("refreshing the state gauges failed; trying again")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
