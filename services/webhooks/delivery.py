"""From events to signed HTTP requests.

`Intake` consumes the events queue: each event is stored once (`webhook_messages`, keyed by
its id) with one delivery row per enabled endpoint of the tenant that wants its type, in one
transaction, and only then acked. A redelivered event finds its rows and adds nothing.

`Deliverer` is the loop that posts: it claims due deliveries (a lease, `FOR UPDATE SKIP LOCKED`
on PostgreSQL, so replicas share the work), posts each with the Standard Webhooks headers, and
records the outcome: delivered, or the next attempt with exponential backoff, or, past the
retry window, failed. An endpoint that has failed every attempt for days is disabled, and the
tenant's other endpoints receive a `webhook.endpoint_disabled` notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import case, func, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from standardwebhooks.webhooks import Webhook

from services.webhooks import domain
from services.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookMessage,
)
from services.webhooks.transport import BlockedAddress, guarded_client
from shared.broker import Delivery
from shared.crypto import Keyring
from shared.db import is_postgres, table_of
from shared.errors import PermanentMessageError
from shared.events import Event, EventType, decode_events
from shared.metrics import (
    WEBHOOK_ATTEMPT_DURATION,
    WEBHOOK_ATTEMPTS,
    WEBHOOK_BACKLOG,
    WEBHOOK_EVENTS,
    WEBHOOK_GIVEN_UP,
)
from shared.settings import WebhookSettings
from shared.timeutil import new_id, utcnow

logger = logging.getLogger("abl.webhooks")

ENDPOINTS = table_of(WebhookEndpoint)
MESSAGES = table_of(WebhookMessage)
DELIVERIES = table_of(WebhookDelivery)
ATTEMPTS = table_of(WebhookAttempt)
CLAIM_BATCH = 200


def secret_aad(tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> bytes:
    """Binds a ciphertext to its tenant and endpoint: copied to another row, it fails to open."""
    return f"abl/webhook-secret/v1/{tenant_id}/{endpoint_id}".encode()


def _insert_ignore(session: AsyncSession, table: Any, rows: list[dict[str, Any]]) -> Any:
    insert = postgresql_insert if is_postgres(session) else sqlite_insert
    return insert(table).values(rows).on_conflict_do_nothing()


def wants(endpoint_types: list[str], event_type: str) -> bool:
    return event_type in endpoint_types or event_type == EventType.webhook_endpoint_disabled


async def fan_out(
    session: AsyncSession,
    events: list[Event],
    retry_window: timedelta,
    *,
    skip_endpoint: uuid.UUID | None = None,
) -> int:
    """Store the `events` an enabled endpoint wants, with one delivery per such endpoint;
    returns how many deliveries were added (none for an event seen before)."""
    if not events:
        return 0
    now = utcnow()
    tenants = {e.tenant_id for e in events}
    endpoints = (
        await session.exec(
            select(ENDPOINTS.c.id, ENDPOINTS.c.tenant_id, ENDPOINTS.c.event_types).where(
                ENDPOINTS.c.tenant_id.in_(tenants), ENDPOINTS.c.enabled.is_(True)
            )
        )
    ).all()
    rows = [
        {
            "id": new_id(),
            "endpoint_id": endpoint_id,
            "message_id": e.id,
            "tenant_id": e.tenant_id,
            "event_type": e.type.value,
            "status": DeliveryStatus.pending.value,
            "attempts": 0,
            "next_attempt_at": now,
            "retry_until": now + retry_window,
            "created_at": now,
        }
        for e in events
        for endpoint_id, tenant_id, types in endpoints
        if tenant_id == e.tenant_id and wants(types, e.type.value) and endpoint_id != skip_endpoint
    ]
    if not rows:
        # Most events concern tenants with no endpoint for them: nothing is stored, so that
        # webhooks cost nothing per email to a tenant that uses none.
        return 0
    wanted = {row["message_id"] for row in rows}
    await session.exec(
        _insert_ignore(
            session,
            MESSAGES,
            [
                {
                    "id": e.id,
                    "tenant_id": e.tenant_id,
                    "type": e.type.value,
                    "payload": e.payload().decode(),
                    "created_at": now,
                }
                for e in {e.id: e for e in events if e.id in wanted}.values()
            ],
        )
    )
    result = await session.exec(_insert_ignore(session, DELIVERIES, rows))
    return int(getattr(result, "rowcount", 0) or 0)


class Intake:
    """Consumes the events queue into the deliveries table.

    The events that arrive while a transaction is being written (up to the consumer's
    prefetch) are stored together in the next one: one transaction per batch instead of one
    per event. Each message is acked only once its batch committed; a batch that fails fails
    each of its messages, which the bus delivers again.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: WebhookSettings,
        on_new: Deliverer | None = None,
    ) -> None:
        self.sessions = sessions
        self.retry_window = timedelta(seconds=settings.webhook_retry_window_seconds)
        self.on_new = on_new
        self.waiting: list[tuple[Event, asyncio.Future[None]]] = []
        self.writer: asyncio.Task[None] | None = None

    async def handle(self, delivery: Delivery) -> None:
        try:
            events = decode_events(delivery.body)
        except ValueError as exc:
            raise PermanentMessageError("not an event") from exc
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []
        for event in events:
            stored: asyncio.Future[None] = loop.create_future()
            self.waiting.append((event, stored))
            waiting.append(stored)
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write_waiting())
        # Acked once every event of the message is stored; otherwise it all comes again
        # (an event stored twice is stored once).
        for outcome in await asyncio.gather(*waiting, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def _write_waiting(self) -> None:
        await asyncio.sleep(0)  # the handlers already scheduled join this batch
        while self.waiting:
            batch, self.waiting = self.waiting[:CLAIM_BATCH], self.waiting[CLAIM_BATCH:]
            try:
                added = await self._store([event for event, _ in batch])
            except Exception:
                # One event that cannot be stored must not fail the others with it (each
                # failure counts towards its message's delivery limit): one at a time.
                added = 0
                for event, stored in batch:
                    try:
                        added += await self._store([event])
                    except Exception as exc:
                        if not stored.done():
                            stored.set_exception(exc)
            for event, stored in batch:
                if not stored.done():
                    WEBHOOK_EVENTS.labels(event.type.value).inc()
                    stored.set_result(None)
            if added and self.on_new is not None:
                self.on_new.wake()

    async def _store(self, events: list[Event]) -> int:
        async with self.sessions() as session, session.begin():
            # A message delivered twice in one batch is stored once.
            unique = list({e.id: e for e in events}.values())
            return await fan_out(session, unique, self.retry_window)


@dataclass(frozen=True)
class Claimed:
    id: uuid.UUID
    endpoint_id: uuid.UUID
    tenant_id: uuid.UUID
    message_id: str
    attempts: int
    retry_until: datetime
    url: str
    secret_ciphertext: str
    payload: str
    previous_secret_ciphertext: str | None = None
    previous_secret_until: datetime | None = None


@dataclass(frozen=True)
class Outcome:
    claimed: Claimed
    status_code: int | None
    error: str | None
    at: datetime
    duration_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status_code is not None and domain.delivered(self.status_code)


class Deliverer:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        settings: WebhookSettings,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.sessions = sessions
        self.keyring = keyring
        self.settings = settings
        self.client = client or guarded_client(
            allow_private=settings.allow_private_hosts,
            timeout=settings.webhook_timeout_seconds,
            connections=settings.webhook_concurrency,
        )
        self.slots = asyncio.Semaphore(settings.webhook_concurrency)
        self._wake = asyncio.Event()
        self._signers: dict[tuple[uuid.UUID, str], Webhook] = {}
        self._recording: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        await self.client.aclose()

    # -- one pass -------------------------------------------------------------------------

    async def claim(self, now: datetime) -> list[Claimed]:
        """Take up to a batch of due deliveries on enabled endpoints, leased for a while: a
        process that dies holding them leaves them to be tried again after the lease."""
        lease = now + timedelta(seconds=self.settings.webhook_lease_seconds)
        async with self.sessions() as session, session.begin():
            due = (
                select(DELIVERIES.c.id)
                .join(ENDPOINTS, ENDPOINTS.c.id == DELIVERIES.c.endpoint_id)
                .where(
                    DELIVERIES.c.status == DeliveryStatus.pending.value,
                    DELIVERIES.c.next_attempt_at <= now,
                    ENDPOINTS.c.enabled.is_(True),
                )
                .order_by(DELIVERIES.c.next_attempt_at)
                .limit(CLAIM_BATCH)
            )
            if is_postgres(session):
                due = due.with_for_update(of=DELIVERIES, skip_locked=True)
            ids = list((await session.exec(due)).all())
            if not ids:
                return []
            await session.exec(
                update(DELIVERIES).where(DELIVERIES.c.id.in_(ids)).values(next_attempt_at=lease)
            )
            # More columns than sqlmodel's select is typed for: a Core select on the
            # session's connection (same transaction).
            connection = await session.connection()
            rows = (
                await connection.execute(
                    sa_select(
                        DELIVERIES.c.id,
                        DELIVERIES.c.endpoint_id,
                        DELIVERIES.c.tenant_id,
                        DELIVERIES.c.message_id,
                        DELIVERIES.c.attempts,
                        DELIVERIES.c.retry_until,
                        ENDPOINTS.c.url,
                        ENDPOINTS.c.secret_ciphertext,
                        MESSAGES.c.payload,
                        ENDPOINTS.c.previous_secret_ciphertext,
                        ENDPOINTS.c.previous_secret_until,
                    )
                    .join(ENDPOINTS, ENDPOINTS.c.id == DELIVERIES.c.endpoint_id)
                    .join(MESSAGES, MESSAGES.c.id == DELIVERIES.c.message_id)
                    .where(DELIVERIES.c.id.in_(ids))
                )
            ).all()
        return [Claimed(*row) for row in rows]

    def signer(self, claimed: Claimed, ciphertext: str) -> Webhook:
        key = (claimed.endpoint_id, ciphertext)
        signer = self._signers.get(key)
        if signer is None:
            secret = self.keyring.decrypt(
                ciphertext, secret_aad(claimed.tenant_id, claimed.endpoint_id)
            )
            signer = Webhook(secret)
            if len(self._signers) > 10_000:
                self._signers.clear()
            self._signers[key] = signer
        return signer

    def signature(self, claimed: Claimed, now: datetime) -> str:
        """`v1,<sig>` with the endpoint's secret, and within a rotation's overlap also with the
        previous one, space-separated (Standard Webhooks): a receiver holding either secret
        verifies the request."""
        ciphertexts = [claimed.secret_ciphertext]
        if (
            claimed.previous_secret_ciphertext
            and claimed.previous_secret_until is not None
            and now < claimed.previous_secret_until
        ):
            ciphertexts.append(claimed.previous_secret_ciphertext)
        return " ".join(
            self.signer(claimed, c).sign(claimed.message_id, now, claimed.payload)
            for c in ciphertexts
        )

    async def attempt(self, claimed: Claimed) -> Outcome:
        now = utcnow()
        signature = self.signature(claimed, now)
        headers = {
            "content-type": "application/json",
            "webhook-id": claimed.message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        started = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        try:
            async with self.slots:
                response = await self.client.post(
                    claimed.url, content=claimed.payload.encode(), headers=headers
                )
            status_code = response.status_code
            outcome = "delivered" if domain.delivered(status_code) else "http_error"
        except BlockedAddress:
            error = outcome = "blocked_host"
        except httpx.TimeoutException:
            error = outcome = "timeout"
        except httpx.HTTPError:
            error = outcome = "connect_failed"
        duration = time.perf_counter() - started
        WEBHOOK_ATTEMPTS.labels(outcome).inc()
        WEBHOOK_ATTEMPT_DURATION.observe(duration)
        return Outcome(claimed, status_code, error, utcnow(), duration)

    async def record(self, outcomes: list[Outcome]) -> None:
        """Write every outcome of a pass in one transaction, then disable endpoints that have
        failed for too long."""
        if not outcomes:
            return
        settings = self.settings
        disable_after = timedelta(seconds=settings.webhook_disable_after_seconds)
        async with self.sessions() as session, session.begin():
            # The per-attempt log; the delivery row below keeps the last attempt only.
            await session.exec(
                ATTEMPTS.insert(),
                params=[
                    {
                        "id": new_id(),
                        "delivery_id": o.claimed.id,
                        "attempt": o.claimed.attempts + 1,
                        "at": o.at,
                        "status_code": o.status_code,
                        "error": o.error,
                        "duration_seconds": o.duration_seconds,
                    }
                    for o in outcomes
                ],
            )
            ok = [o for o in outcomes if o.ok]
            if ok:
                await session.exec(
                    update(DELIVERIES)
                    .where(DELIVERIES.c.id.in_([o.claimed.id for o in ok]))
                    .values(
                        status=DeliveryStatus.delivered.value,
                        attempts=DELIVERIES.c.attempts + 1,
                        last_status_code=_status_of(ok),
                        last_error=None,
                        last_attempt_at=ok[0].at,
                        delivered_at=ok[0].at,
                        next_attempt_at=None,
                    )
                )
                # Only an endpoint that was failing is written: a healthy one's row is not
                # rewritten (and locked) by every pass.
                await session.exec(
                    update(ENDPOINTS)
                    .where(
                        ENDPOINTS.c.id.in_({o.claimed.endpoint_id for o in ok}),
                        ENDPOINTS.c.failing_since.is_not(None),
                    )
                    .values(failing_since=None)
                )
            for o in outcomes:
                if o.ok:
                    continue
                attempts = o.claimed.attempts + 1
                gave_up = o.at >= o.claimed.retry_until
                if gave_up:
                    WEBHOOK_GIVEN_UP.labels("delivery").inc()
                await session.exec(
                    update(DELIVERIES)
                    .where(DELIVERIES.c.id == o.claimed.id)
                    .values(
                        status=(DeliveryStatus.failed if gave_up else DeliveryStatus.pending).value,
                        attempts=attempts,
                        last_status_code=o.status_code,
                        last_error=o.error,
                        last_attempt_at=o.at,
                        next_attempt_at=None
                        if gave_up
                        else domain.next_attempt(
                            attempts,
                            o.at,
                            base_seconds=settings.webhook_retry_base_seconds,
                            cap_seconds=settings.webhook_retry_cap_seconds,
                        ),
                    )
                )
            failed_endpoints = {o.claimed.endpoint_id for o in outcomes if not o.ok} - {
                o.claimed.endpoint_id for o in ok
            }
            if failed_endpoints:
                now = max(o.at for o in outcomes)
                await session.exec(
                    update(ENDPOINTS)
                    .where(
                        ENDPOINTS.c.id.in_(failed_endpoints), ENDPOINTS.c.failing_since.is_(None)
                    )
                    .values(failing_since=now)
                )
                await self._disable_long_failing(session, failed_endpoints, now, disable_after)

    async def _disable_long_failing(
        self,
        session: AsyncSession,
        endpoint_ids: set[uuid.UUID],
        now: datetime,
        after: timedelta,
    ) -> None:
        rows = (
            await session.exec(
                select(ENDPOINTS.c.id, ENDPOINTS.c.tenant_id, ENDPOINTS.c.failing_since).where(
                    ENDPOINTS.c.id.in_(endpoint_ids), ENDPOINTS.c.enabled.is_(True)
                )
            )
        ).all()
        for endpoint_id, tenant_id, failing_since in rows:
            if not domain.should_disable(failing_since, now, after):
                continue
            reason = f"every delivery failed since {failing_since.isoformat()}"
            await session.exec(
                update(ENDPOINTS)
                .where(ENDPOINTS.c.id == endpoint_id)
                .values(enabled=False, disabled_reason=reason, updated_at=now)
            )
            WEBHOOK_GIVEN_UP.labels("endpoint").inc()
            logger.warning("webhook endpoint %s disabled: %s", endpoint_id, reason)
            notice = Event(
                type=EventType.webhook_endpoint_disabled,
                tenant_id=tenant_id,
                timestamp=now,
                data={
                    "endpoint_id": str(endpoint_id),
                    "status": "disabled",
                    "previous_status": "enabled",
                    "reason": reason,
                },
            )
            await fan_out(
                session,
                [notice],
                timedelta(seconds=self.settings.webhook_retry_window_seconds),
                skip_endpoint=endpoint_id,
            )

    async def run_once(self) -> int:
        """One pass: claim, post concurrently, record. Returns how many were attempted.

        The outcomes are written while the next pass claims and posts (one write in flight
        at most): what was claimed stays leased until its outcome lands, so no delivery is
        claimed twice, and the posts do not wait for the database in between."""
        claimed = await self.claim(utcnow())
        if not claimed:
            await self.finish_recording()
            return 0
        outcomes = await asyncio.gather(*(self.attempt(c) for c in claimed))
        await self.finish_recording()
        self._recording = asyncio.create_task(self.record(list(outcomes)))
        return len(claimed)

    async def finish_recording(self) -> None:
        task, self._recording = self._recording, None
        if task is None:
            return
        try:
            await task
        except Exception:
            # Those deliveries stay leased and are tried again after the lease.
            logger.exception("recording webhook outcomes failed")

    async def backlog(self) -> int:
        async with self.sessions() as session:
            count = await session.exec(
                select(func.count())
                .select_from(DELIVERIES)
                .join(ENDPOINTS, ENDPOINTS.c.id == DELIVERIES.c.endpoint_id)
                .where(
                    DELIVERIES.c.status == DeliveryStatus.pending.value,
                    ENDPOINTS.c.enabled.is_(True),
                )
            )
            return int(count.one())

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        last_gauge = 0.0
        while not stop.is_set():
            self._wake.clear()
            attempted = 0
            try:
                attempted = await self.run_once()
                if loop.time() - last_gauge > 15:
                    WEBHOOK_BACKLOG.set(await self.backlog())
                    last_gauge = loop.time()
            except Exception:
                logger.exception("webhook delivery pass failed; retrying")
            if attempted:
                continue  # more may be due: no wait while there is work
            waiter = asyncio.create_task(self._wake.wait())
            stopper = asyncio.create_task(stop.wait())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(
                    {waiter, stopper},
                    timeout=self.settings.webhook_tick_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            waiter.cancel()
            stopper.cancel()
        await self.finish_recording()


def _status_of(ok: list[Outcome]) -> Any:
    """The per-row status code of a batch of successes, as one CASE expression."""
    codes = {o.status_code for o in ok}
    if len(codes) == 1:
        return codes.pop()
    return case({o.claimed.id: o.status_code for o in ok}, value=DELIVERIES.c.id, else_=200)


async def redeliver(
    session: AsyncSession, delivery_id: uuid.UUID, endpoint_id: uuid.UUID, window: timedelta
) -> bool:
    """Queue a delivery again now, with a new retry window; False when it does not exist."""
    now = utcnow()
    result = await session.exec(
        update(DELIVERIES)
        .where(DELIVERIES.c.id == delivery_id, DELIVERIES.c.endpoint_id == endpoint_id)
        .values(
            status=DeliveryStatus.pending.value,
            next_attempt_at=now,
            retry_until=now + window,
            delivered_at=None,
        )
    )
    return bool(getattr(result, "rowcount", 0))
