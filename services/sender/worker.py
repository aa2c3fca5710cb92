"""The sender's consumer: one job in, one SMTP transaction, one confirmed result event out.

The job carries what delivery needs, so a first delivery asks nobody but the registry (for
credentials, cached). Only a job that may have been handled before (redelivered by the broker,
or published again by the scheduler after its lease) is checked with the scheduler, batched,
so that an email already sent, unknown or canceled is not sent twice.

When the registry, the scheduler or the broker cannot answer, the worker waits with backoff
(bounded by `ABL_DEPENDENCY_WAIT_SECONDS`) instead of returning the job at once: someone else's
outage must not burn the job's delivery limit. The job is acked only after its result event is
confirmed by the broker (results that finish together travel in one message: `reporting`). A
job that cannot be parsed is dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.sender.clients import BatchedJobStates, CredentialsSource, DependencyUnavailable
from services.sender.delivery import CANCELED_BEFORE_SENDING, Attempt, Deliverer
from services.sender.domain import ServerProblem, Verdict
from services.sender.reporting import BatchedResults
from shared.backoff import GaveUp, patiently
from shared.broker import Bus, Delivery
from shared.errors import TransientMessageError
from shared.messages import CancelNotice, Outcome, SendJob, SendResult, SmtpCredentials, parse
from shared.metrics import (
    DELIVERY_DURATION,
    DEPENDENCY_WAITS,
    JOBS_IN_FLIGHT,
    JOBS_SKIPPED,
    RESULTS_REPORTED_DIRECTLY,
    SENDER_OUTCOMES,
    SMTP_REPLIES,
)
from shared.settings import SenderSettings
from shared.timeutil import utcnow

logger = logging.getLogger("abl.sender")

T = TypeVar("T")


class ResultNotReported(Exception):
    """Neither the broker nor the scheduler took the result yet."""


REMEMBERED_RESULTS = 10_000


class Worker:
    def __init__(
        self,
        settings: SenderSettings,
        bus: Bus,
        registry: CredentialsSource,
        job_states: BatchedJobStates,
        deliverer: Deliverer,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.registry = registry
        self.job_states = job_states
        self.deliverer = deliverer
        self.results = BatchedResults(bus, settings.results_queue)
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = asyncio.Event()
        # Jobs whose result this worker got confirmed. A broker restart can return such a job
        # (its ack was lost with the channel) before the scheduler has applied the result, when
        # asking the scheduler would still say "sendable"; if it comes back here, it is known.
        self.reported: OrderedDict[uuid.UUID, None] = OrderedDict()
        # Jobs of scheduled emails the tenant canceled, as the scheduler broadcast them.
        self.canceled: OrderedDict[uuid.UUID, None] = OrderedDict()

    async def start(self) -> None:
        await self.bus.subscribe(self.settings.cancels_topic, self.on_cancel)
        await self.bus.consume(
            self.settings.send_jobs_queue, self.handle, prefetch=self.settings.sender_prefetch
        )

    async def on_cancel(self, delivery: Delivery) -> None:
        notice = parse(CancelNotice, delivery.body)
        self.canceled[notice.job_id] = None
        if len(self.canceled) > REMEMBERED_RESULTS:
            self.canceled.popitem(last=False)

    def consuming(self) -> bool:
        return not self.stopping.is_set() and self.bus.consuming(self.settings.send_jobs_queue)

    async def handle(self, delivery: Delivery) -> None:
        job = parse(SendJob, delivery.body)
        self.in_flight += 1
        self.idle.clear()
        JOBS_IN_FLIGHT.inc()
        try:
            await self._handle(job, maybe_seen=delivery.redelivered or job.republished)
        finally:
            self.in_flight -= 1
            JOBS_IN_FLIGHT.dec()
            if self.in_flight == 0:
                self.idle.set()

    async def _patiently(
        self,
        what: str,
        call: Callable[[], Awaitable[T]],
        retry_on: tuple[type[Exception], ...] = (DependencyUnavailable,),
    ) -> T:
        """`call()`, tried again while `what` is unavailable; past the bound (or when this
        worker stops) the job goes back to the queue."""
        try:
            return await patiently(
                call,
                retry_on=retry_on,
                limit_seconds=self.settings.dependency_wait_seconds,
                what=what,
                logger=logger,
                stopping=self.stopping.is_set,
                on_wait=DEPENDENCY_WAITS.labels(what).inc,
            )
        except GaveUp as exc:
            raise TransientMessageError(str(exc)) from exc

    async def _handle(self, job: SendJob, *, maybe_seen: bool) -> None:
        if maybe_seen and job.job_id in self.reported:
            JOBS_SKIPPED.inc()
            return
        if maybe_seen:
            sendable = await self._patiently(
                "scheduler", lambda: self.job_states.is_sendable(job.email_id, job.job_id)
            )
            if not sendable:
                JOBS_SKIPPED.inc()
                # Sent, unknown, canceled, or moved on: at most once towards the server. For a
                # canceled email this report gives its reservation back; otherwise the
                # scheduler ignores it (it names an attempt that is over).
                await self._report_skipped(job)
                return
        if job.job_id in self.canceled:
            JOBS_SKIPPED.inc()
            await self._report_skipped(job)
            return
        credentials = await self._patiently(
            "registry", lambda: self.registry.credentials(job.server_id)
        )
        report = True
        if credentials is None or credentials.status != "active":
            attempt = Attempt(
                Verdict(Outcome.retry, False, ServerProblem.inactive, "server not active")
            )
        else:
            attempt = await self._deliver(job, credentials)
            if (
                attempt.verdict.server_problem is ServerProblem.auth_failed
                and credentials.auth == "xoauth2"
            ):
                # Most likely the access token expired or was revoked early: one new token
                # (refreshed once for every job of this server) and one more try.
                fresh = await self._patiently(
                    "registry", lambda: self.registry.refreshed(job.server_id, credentials)
                )
                if fresh is not None and fresh.status == "active" and fresh.access_token:
                    attempt = await self._deliver(job, fresh)
                else:
                    # The refresh was refused (invalid_grant): the registry has marked the
                    # server auth_failed with its reason, which a report would overwrite.
                    report = False
                    attempt = Attempt(
                        Verdict(
                            Outcome.retry,
                            False,
                            ServerProblem.auth_failed,
                            "OAuth grant revoked: reconnect this account",
                        )
                    )
        verdict = attempt.verdict
        if attempt.code is not None:
            SMTP_REPLIES.labels(f"{attempt.code // 100}xx").inc()
        if verdict.server_problem is ServerProblem.auth_failed and report:
            # The one path of a refused login: the registry decides the server's status, and
            # the scheduler learns it from the registry's change, so the registry must hear it.
            reply = f"{attempt.code} {attempt.reply or ''}".strip()
            await self._patiently(
                "registry", lambda: self.registry.report_auth_failure(job.server_id, reply)
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
        await self._patiently(
            "broker and scheduler", lambda: self._report(result), retry_on=(ResultNotReported,)
        )
        self.reported[job.job_id] = None
        if len(self.reported) > REMEMBERED_RESULTS:
            self.reported.popitem(last=False)
        SENDER_OUTCOMES.labels(verdict.outcome.value).inc()

    async def _report_skipped(self, job: SendJob) -> None:
        result = SendResult(
            job_id=job.job_id,
            email_id=job.email_id,
            tenant_id=job.tenant_id,
            server_id=job.server_id,
            attempt=job.attempt,
            outcome=Outcome.failed,
            smtp_reply=CANCELED_BEFORE_SENDING,
            data_completed=False,
            finished_at=utcnow(),
        )
        await self._patiently(
            "broker and scheduler", lambda: self._report(result), retry_on=(ResultNotReported,)
        )

    async def _report(self, result: SendResult) -> None:
        """Get the result of a finished SMTP transaction to the scheduler: through the broker,
        or, while the broker is away, straight to the scheduler's internal route. Otherwise the
        job, redelivered after the broker's return, could reach a sender that asks the scheduler
        before the result arrived, and be sent twice."""
        try:
            await self.results.publish(result)
            return
        except Exception as exc:  # whatever the client library raises while the broker is away
            broker_error = exc
        try:
            await self.job_states.report(result)
        except DependencyUnavailable as exc:
            raise ResultNotReported(
                f"broker ({type(broker_error).__name__}) and scheduler unavailable"
            ) from exc
        RESULTS_REPORTED_DIRECTLY.inc()

    async def _deliver(self, job: SendJob, credentials: SmtpCredentials) -> Attempt:
        started = time.perf_counter()
        attempt = await self.deliverer.deliver(
            job, credentials, utcnow(), canceled=lambda: job.job_id in self.canceled
        )
        DELIVERY_DURATION.observe(time.perf_counter() - started)
        return attempt

    async def drain(self, grace_seconds: float) -> bool:
        """Stop taking jobs and wait for those in flight; True when all finished in time."""
        self.stopping.set()
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
