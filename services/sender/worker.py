"""The sender's consumer: one job in, one SMTP transaction, one confirmed result event out.

The job is acked only after its result event is confirmed by the broker. A job that cannot be
parsed is dead-lettered; a job whose email is no longer this attempt's (already sent, unknown,
canceled, or retried elsewhere) is acked without sending.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.sender.clients import RegistryClient, SchedulerClient
from services.sender.delivery import Attempt, Deliverer
from services.sender.domain import ServerProblem, Verdict
from shared.broker import Bus, Delivery
from shared.errors import TransientMessageError
from shared.messages import Outcome, SendJob, SendResult, parse
from shared.metrics import (
    DELIVERY_DURATION,
    JOBS_IN_FLIGHT,
    JOBS_SKIPPED,
    SENDER_OUTCOMES,
    SMTP_REPLIES,
)
from shared.settings import Settings
from shared.timeutil import utcnow

logger = logging.getLogger("abl.sender")


class Worker:
    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        registry: RegistryClient,
        scheduler: SchedulerClient,
        deliverer: Deliverer,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.registry = registry
        self.scheduler = scheduler
        self.deliverer = deliverer
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def start(self) -> None:
        await self.bus.declare(self.settings.results_queue)
        await self.bus.consume(
            self.settings.send_jobs_queue, self.handle, prefetch=self.settings.sender_prefetch
        )

    async def handle(self, delivery: Delivery) -> None:
        job = parse(SendJob, delivery.body)
        self.in_flight += 1
        self.idle.clear()
        JOBS_IN_FLIGHT.inc()
        try:
            await self._handle(job)
        finally:
            self.in_flight -= 1
            JOBS_IN_FLIGHT.dec()
            if self.in_flight == 0:
                self.idle.set()

    async def _handle(self, job: SendJob) -> None:
        # Both look-ups at once: they are independent, and the credentials are usually cached.
        sendable, credentials = await asyncio.gather(
            self.scheduler.sendable(job.email_id, job.job_id),
            self.registry.credentials(job.server_id),
        )
        if not sendable:
            JOBS_SKIPPED.inc()
            return  # sent, unknown or canceled already: at most once towards the server
        if credentials is None or credentials.status != "active":
            attempt = Attempt(Verdict(Outcome.retry, False, reason="server not active"))
        else:
            started = time.perf_counter()
            attempt = await self.deliverer.deliver(job, credentials, utcnow())
            DELIVERY_DURATION.observe(time.perf_counter() - started)
        verdict = attempt.verdict
        if attempt.code is not None:
            SMTP_REPLIES.labels(f"{attempt.code // 100}xx").inc()
        if verdict.server_problem is ServerProblem.auth_failed:
            await self.registry.report_auth_failure(
                job.server_id, f"{attempt.code} {attempt.reply or ''}".strip()
            )
        result = SendResult(
            job_id=job.job_id,
            email_id=job.email_id,
            tenant_id=job.tenant_id,
            server_id=job.server_id,
            attempt=job.attempt,
            outcome=verdict.outcome,
            smtp_code=attempt.code,
            smtp_reply=(attempt.reply or verdict.reason)[:1000],
            data_completed=verdict.data_completed,
            server_problem=verdict.server_problem.value if verdict.server_problem else None,
            finished_at=utcnow(),
        )
        try:
            await self.bus.publish(
                self.settings.results_queue,
                result.model_dump_json().encode(),
                message_id=f"{job.job_id}:result",
            )
        except Exception as exc:
            # The job goes back to the queue. If the email did leave, its redelivery finds it
            # still `scheduled` and sends it again: the same, bounded, duplicate as a kill -9
            # between the server's reply and the result event.
            raise TransientMessageError(f"result not confirmed: {type(exc).__name__}") from exc
        SENDER_OUTCOMES.labels(verdict.outcome.value).inc()

    async def drain(self, grace_seconds: float) -> bool:
        """Stop taking jobs and wait for those in flight; True when all finished in time."""
        await self.bus.stop_consuming(self.settings.send_jobs_queue)
        try:
            await asyncio.wait_for(self.idle.wait(), timeout=grace_seconds)
        except TimeoutError:
            logger.warning(
                "%d jobs still in flight after %.0f s: they return to the queue",
                self.in_flight,
                grace_seconds,
            )
            return False
        return True
