"""Applies the senders' result events to emails, allowances and server health.

An event is applied only to the attempt it reports on (its `job_id`); a redelivered or stale
event changes nothing, so the consumer is safe to repeat.

Events are applied in small batches, one transaction each: a message is acked only after the
transaction holding its change has committed (its handler waits for that), and the counters of
a batch are summed and written in server order, so concurrent batches cannot deadlock on them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import events, lifecycle, repository
from services.scheduler.domain import RetryPolicy, SendingWindow
from services.scheduler.lifecycle import EmailStatus, Step
from shared.batching import Batches
from shared.broker import Delivery
from shared.db import in_transaction
from shared.events import EMAIL_EVENTS
from shared.messages import Outcome, SendResult, parse_results
from shared.metrics import EMAILS_FINISHED, RESULTS_APPLIED
from shared.timeutil import utcnow

logger = logging.getLogger("abl.scheduler.results")

QUOTA_PROBLEM = repository.QUOTA_PARK
AUTH_PROBLEM = "auth_failed"
INACTIVE_PROBLEM = "inactive"
# Problems the registry decides: the scheduler reads the server again from it at once, so its
# copy does not send the next job there before the registry's change arrives.
REGISTRY_PROBLEMS = frozenset({AUTH_PROBLEM, INACTIVE_PROBLEM})
BATCH_SIZE = 200


@dataclass
class CounterChanges:
    """What a batch does to the per-server counters, summed before it is written."""

    released: Counter[tuple[uuid.UUID, date]] = field(default_factory=Counter)
    released_hours: Counter[tuple[uuid.UUID, datetime]] = field(default_factory=Counter)
    delivered: Counter[tuple[uuid.UUID, date]] = field(default_factory=Counter)
    parks: dict[uuid.UUID, tuple[datetime, str]] = field(default_factory=dict)

    async def write(self, session: AsyncSession, now: datetime) -> None:
        days = {
            key: (self.released[key], self.delivered[key])
            for key in self.released.keys() | self.delivered.keys()
        }
        await repository.write_counters(session, days=days, hours=dict(self.released_hours))
        if self.parks:
            parked = await repository.park_many(session, self.parks, now)
            # A quota park is the scheduler's own status change.
            await events.write(
                session,
                [
                    events.parked_event(p.tenant_id, p.server_id, p.reason, p.until, now)
                    for p in parked
                    if p.reason == QUOTA_PROBLEM
                ],
            )


@dataclass(slots=True)
class EmailState:
    """What the applier reads and changes of one email: a plain record, not an ORM object."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    job_id: uuid.UUID | None
    status: str
    attempts: int
    reserved_day: date | None
    reserved_hour: datetime | None
    not_before: datetime
    sent_at: datetime | None
    last_smtp_code: int | None = None
    last_smtp_reply: str | None = None
    campaign: str | None = None
    server_id: uuid.UUID | None = None

    def row(self) -> tuple[Any, ...]:
        """The values `repository.update_results` writes."""
        return (
            self.id,
            self.status,
            self.attempts,
            self.not_before,
            self.job_id,
            self.last_smtp_code,
            self.last_smtp_reply,
            self.sent_at,
        )


def finished(emails: Iterable[EmailState]) -> list[events.Finished]:
    """The emails of a batch that reached a status announced by an event."""
    return [
        events.Finished(
            email_id=e.id,
            tenant_id=e.tenant_id,
            status=e.status,
            server_id=e.server_id,
            campaign=e.campaign,
            attempts=e.attempts,
            smtp_code=e.last_smtp_code,
            smtp_reply=e.last_smtp_reply,
        )
        for e in emails
        if e.status in EMAIL_EVENTS
    ]


class ResultApplier:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        retry: RetryPolicy,
        rng: random.Random | None = None,
        *,
        server_news: Callable[[uuid.UUID], Awaitable[None]] | None = None,
    ) -> None:
        self.sessions = sessions
        self.retry = retry
        # Told, after the commit, of each server a result said the registry has a word on
        # (`RegistryCopy.refresh_server`).
        self.server_news = server_news
        self.rng = rng or random.Random()  # noqa: S311 - backoff jitter, not security
        # Results that arrive while a transaction is being written go in the next one.
        self.batches: Batches[SendResult, bool] = Batches(self.apply_many, max_batch=BATCH_SIZE)

    async def handle(self, delivery: Delivery) -> None:
        # The message is acked only once every result it holds is committed; if one batch
        # failed, the whole message comes back (applying a result again changes nothing).
        outcomes = await asyncio.gather(
            *(self.batches.submit(result) for result in parse_results(delivery.body)),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def close(self) -> None:
        await self.batches.close()

    async def apply(self, result: SendResult, now: datetime | None = None) -> bool:
        """Apply one result; False when it was a duplicate or stale."""
        return (await self.apply_many([result], now))[0]

    async def apply_many(
        self, results: list[SendResult], now: datetime | None = None
    ) -> list[bool]:
        moment = now or utcnow()

        async def work(session: AsyncSession) -> list[bool]:
            rows = await repository.emails_for_results(session, {r.email_id for r in results})
            emails = {
                row.id: EmailState(
                    row.id,
                    row.tenant_id,
                    row.job_id,
                    row.status,
                    row.attempts,
                    row.reserved_day,
                    row.reserved_hour,
                    row.not_before,
                    row.sent_at,
                    campaign=row.campaign,
                )
                for row in rows
            }
            changes = CounterChanges()
            windows: dict[uuid.UUID, SendingWindow] = {}
            changed: dict[uuid.UUID, EmailState] = {}
            applied: list[bool] = []
            for result in results:
                email = emails.get(result.email_id)
                current = (
                    email is not None
                    and email.job_id == result.job_id
                    and email.status in lifecycle.AWAITING_RESULT
                )
                if email is None or not current:
                    applied.append(False)
                    continue
                await self._apply(session, email, result, moment, changes, windows)
                email.server_id = result.server_id
                changed[email.id] = email
                applied.append(True)
            await repository.update_results(
                session, [email.row() for email in changed.values()], moment
            )
            await changes.write(session, moment)
            # email.sent / failed / unknown for the webhooks, in this transaction: written
            # exactly when the status is, and published after the commit.
            await events.write(session, events.email_events(finished(changed.values()), moment))
            return applied

        applied = await in_transaction(self.sessions, work)
        for result, ok in zip(results, applied, strict=True):
            RESULTS_APPLIED.labels(result.outcome.value if ok else "duplicate").inc()
            if ok:
                EMAILS_FINISHED.labels(result.outcome.value).inc()
        if self.server_news is not None:
            for server_id in {
                r.server_id for r in results if r.server_problem in REGISTRY_PROBLEMS
            }:
                try:
                    await self.server_news(server_id)
                except Exception as exc:  # the registry's change still arrives by the bus
                    logger.warning(
                        "copy of server %s not refreshed (%s)", server_id, type(exc).__name__
                    )
        return applied

    async def _apply(
        self,
        session: AsyncSession,
        email: EmailState,
        result: SendResult,
        now: datetime,
        changes: CounterChanges,
        windows: dict[uuid.UUID, SendingWindow],
    ) -> None:
        server_id = result.server_id
        email.last_smtp_code = result.smtp_code
        email.last_smtp_reply = (result.smtp_reply or "")[:1000] or None
        if result.outcome is Outcome.retry and result.server_problem != INACTIVE_PROBLEM:
            # A job sent to a server the registry had stopped is not an attempt of the email.
            email.attempts += 1
        step = lifecycle.attempt_step(result.outcome, email.attempts, self.retry.max_attempts)
        email.status = lifecycle.after(EmailStatus(email.status), step)
        effects = lifecycle.effects(step, data_completed=result.data_completed)
        if effects.release:
            if email.reserved_day is not None:
                changes.released[(server_id, email.reserved_day)] += 1
            if email.reserved_hour is not None:
                changes.released_hours[(server_id, email.reserved_hour)] += 1
        if effects.deliver and email.reserved_day is not None:
            changes.delivered[(server_id, email.reserved_day)] += 1
        if step is Step.deliver:
            email.sent_at = result.finished_at
        elif email.status == EmailStatus.queued:
            email.not_before = now + self.retry.delay(email.attempts, self.rng)
            # server_id keeps the server that failed, so the retry prefers another one.
        # The attempt is over for a queued (retried) or canceled email: a repeated result for
        # it must not give the reservation back twice.
        over = email.status in (EmailStatus.queued, EmailStatus.canceled)
        email.job_id = None if over else email.job_id
        if result.server_problem == QUOTA_PROBLEM:
            window = windows.get(email.tenant_id)
            if window is None:
                window = await repository.sending_window(session, email.tenant_id)
                windows[email.tenant_id] = window
            changes.parks[server_id] = (window.next_day_start(now), QUOTA_PROBLEM)
        if result.server_problem in (QUOTA_PROBLEM, *REGISTRY_PROBLEMS) and (
            email.status == EmailStatus.queued
        ):
            # Another server may take it at once. A refused login, or a server the registry had
            # stopped, is the registry's to decide (the sender told it first): the copy reads
            # the server again after the commit (`server_news`), and the registry's change
            # comes by the bus too.
            email.not_before = now
