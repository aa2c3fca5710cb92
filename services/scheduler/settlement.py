"""Every email the API accepted reaches a final state, whatever happened to its job.

- Dead letters: a send job the broker dead-lettered (delivery limit, expired in its queue) is
  settled like a failed attempt that never reached DATA: its email returns to `queued` with
  `attempts + 1` and its reservation given back, or ends `failed` once its attempts are spent.
  A dead-lettered result event is applied again. What cannot be parsed is parked in
  `<queue>.parked` for an operator, and counted.
- The sweep: an email still `scheduled` long after its job was published (longer than a job may
  wait in its queue, so the job is no longer queued: it expired into the dead-letter queue, or a
  sender holds it, or the broker lost it) is settled the same way.
- Patience: while the database is away, these handlers and the result consumer wait and retry
  instead of returning messages to their queues in a storm.

A settlement is a result event like a sender's (`retry`, DATA not completed), applied by the
same `ResultApplier`, to the attempt it names only: repeating it, or racing a late real result,
changes nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import repository
from services.scheduler.repository import SendResultKey
from services.scheduler.results import ResultApplier
from shared.broker import Bus, Delivery, dead_letter_queue, queue_kind
from shared.db import patient_handler as patient_handler
from shared.errors import PermanentMessageError
from shared.messages import Outcome, SendJob, SendResult, parse_results
from shared.metrics import DEAD_LETTERS_SETTLED, EMAILS_SWEPT
from shared.settings import SchedulerSettings
from shared.timeutil import utcnow

logger = logging.getLogger("abl.scheduler.settlement")

DEAD_LETTER_PREFETCH = 32
SWEEP_EVERY_SECONDS = 60.0
SWEEP_BATCH = 500


def settlement(key: SendResultKey, attempt: int, reason: str, now: datetime) -> SendResult:
    """The result event that settles an attempt no sender reported on."""
    return SendResult(
        job_id=key.job_id,
        email_id=key.email_id,
        tenant_id=key.tenant_id,
        server_id=key.server_id,
        attempt=attempt,
        outcome=Outcome.retry,
        smtp_code=None,
        smtp_reply=reason[:1000],
        data_completed=False,
        finished_at=now,
    )


class Settler:
    def __init__(
        self,
        settings: SchedulerSettings,
        sessions: async_sessionmaker[AsyncSession],
        bus: Bus,
        applier: ResultApplier,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.bus = bus
        self.applier = applier

    @property
    def dead_job_queue(self) -> str:
        return dead_letter_queue(self.settings.send_jobs_queue)

    @property
    def dead_result_queue(self) -> str:
        return dead_letter_queue(self.settings.results_queue)

    async def start(self) -> None:
        await self.bus.consume(
            self.dead_job_queue,
            patient_handler(self.on_dead_job, self.settings.dependency_wait_seconds, "dead job"),
            prefetch=DEAD_LETTER_PREFETCH,
        )
        await self.bus.consume(
            self.dead_result_queue,
            patient_handler(
                self.on_dead_result, self.settings.dependency_wait_seconds, "dead result"
            ),
            prefetch=DEAD_LETTER_PREFETCH,
        )

    def consuming(self) -> bool:
        return self.bus.consuming(self.dead_job_queue) and self.bus.consuming(
            self.dead_result_queue
        )

    async def _park(self, queue: str, delivery: Delivery) -> None:
        logger.error("parking an unparsable message from %s for an operator", queue)
        await self.bus.park(queue, delivery.body, message_id=delivery.message_id)
        DEAD_LETTERS_SETTLED.labels(queue_kind(queue), "parked").inc()

    async def on_dead_job(self, delivery: Delivery) -> None:
        try:
            job = SendJob.model_validate_json(delivery.body)
        except ValidationError:
            await self._park(self.dead_job_queue, delivery)
            return
        key = SendResultKey(job.email_id, job.job_id, job.tenant_id, job.server_id)
        reason = f"job dead-lettered ({delivery.death_reason or 'unknown reason'})"
        (applied,) = await self.applier.apply_many([settlement(key, job.attempt, reason, utcnow())])
        DEAD_LETTERS_SETTLED.labels("send-jobs", "settled" if applied else "stale").inc()

    async def on_dead_result(self, delivery: Delivery) -> None:
        try:
            results = parse_results(delivery.body)
        except PermanentMessageError:
            await self._park(self.dead_result_queue, delivery)
            return
        for applied in await self.applier.apply_many(results):
            DEAD_LETTERS_SETTLED.labels("results", "settled" if applied else "stale").inc()

    async def sweep(self, now: datetime | None = None) -> int:
        """Settle emails `scheduled` with no result long after their publish; how many."""
        moment = now or utcnow()
        before = moment - timedelta(seconds=self.settings.sweep_after_seconds)
        async with self.sessions() as session:
            stale = await repository.stale_scheduled(session, before, SWEEP_BATCH)
        if not stale:
            return 0
        reason = f"no result {self.settings.sweep_after_seconds:.0f} s after publish: swept"
        # The attempt number does not decide anything in the applier (the job id does).
        applied = await self.applier.apply_many(
            [settlement(key, 1, reason, moment) for key in stale], moment
        )
        swept = sum(applied)
        if swept:
            logger.warning("swept %d emails left scheduled with no result", swept)
            EMAILS_SWEPT.inc(swept)
        return swept

    async def run_sweeps(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception:
                logger.exception("sweep failed; trying again later")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_EVERY_SECONDS)
