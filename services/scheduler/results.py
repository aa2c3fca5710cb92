"""Applies the senders' result events to emails, allowances and server health.

An event is applied only to the attempt it reports on (its `job_id`); a redelivered or stale
event changes nothing, so the consumer is safe to repeat.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import repository
from services.scheduler.domain import RetryPolicy
from services.scheduler.models import Email, EmailStatus
from shared.broker import Delivery
from shared.messages import Outcome, SendResult, parse
from shared.metrics import EMAILS_FINISHED, RESULTS_APPLIED
from shared.timeutil import utcnow

logger = logging.getLogger("abl.scheduler.results")

QUOTA_PROBLEM = "quota"
AUTH_PROBLEM = "auth_failed"


class ResultApplier:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        retry: RetryPolicy,
        auth_park: timedelta,
        rng: random.Random | None = None,
    ) -> None:
        self.sessions = sessions
        self.retry = retry
        self.auth_park = auth_park
        self.rng = rng or random.Random()  # noqa: S311 - backoff jitter, not security

    async def handle(self, delivery: Delivery) -> None:
        await self.apply(parse(SendResult, delivery.body))

    async def apply(self, result: SendResult, now: datetime | None = None) -> bool:
        """Apply one result; False when it was a duplicate or stale."""
        moment = now or utcnow()
        async with self.sessions() as session, session.begin():
            email = await session.get(Email, result.email_id, with_for_update=True)
            if (
                email is None
                or email.job_id != result.job_id
                or email.status
                not in (
                    EmailStatus.scheduled,
                    EmailStatus.canceled,
                )
            ):
                RESULTS_APPLIED.labels("duplicate").inc()
                return False
            await self._apply(session, email, result, moment)
        RESULTS_APPLIED.labels(result.outcome.value).inc()
        EMAILS_FINISHED.labels(result.outcome.value).inc()
        return True

    async def _apply(
        self, session: AsyncSession, email: Email, result: SendResult, now: datetime
    ) -> None:
        server_id = result.server_id
        email.last_smtp_code = result.smtp_code
        email.last_smtp_reply = (result.smtp_reply or "")[:1000] or None
        email.updated_at = now
        if not result.data_completed:
            await repository.release(session, server_id, email.reserved_day, email.reserved_hour)
        canceled = email.status == EmailStatus.canceled
        if result.outcome is Outcome.sent:
            email.status = EmailStatus.sent  # it left: the truth wins over a late cancel
            email.sent_at = result.finished_at
            if email.reserved_day is not None:
                await repository.count_delivered(session, server_id, email.reserved_day)
        elif result.outcome is Outcome.unknown:
            email.status = EmailStatus.unknown
        elif result.outcome is Outcome.failed:
            email.status = EmailStatus.canceled if canceled else EmailStatus.failed
        else:
            email.attempts += 1
            if canceled:
                pass
            elif email.attempts >= self.retry.max_attempts:
                email.status = EmailStatus.failed
            else:
                email.status = EmailStatus.queued
                email.not_before = now + self.retry.delay(email.attempts, self.rng)
                # server_id keeps the server that failed, so the retry prefers another one.
        email.job_id = None if email.status == EmailStatus.queued else email.job_id
        if result.server_problem in (QUOTA_PROBLEM, AUTH_PROBLEM):
            window = await repository.sending_window(session, email.tenant_id)
            until = (
                window.next_day_start(now)
                if result.server_problem == QUOTA_PROBLEM
                else now + self.auth_park
            )
            await repository.park(session, server_id, until, result.server_problem)
            if email.status == EmailStatus.queued:
                email.not_before = now  # another server may take it at once
        session.add(email)
