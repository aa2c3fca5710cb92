"""The transactional outbox: events written in the transaction that makes a change, published
to the broker after that transaction commits, with confirms; nothing is lost in between.

One implementation for every service; each service has its own outbox table (a subclass of
`OutboxRecord` with `table=True` in its own models: `shared/` defines no service's table).

- `Outbox.write(session, events)` inserts the events with the caller's session: they commit or
  roll back with the change they describe.
- After the commit, the relay (`Outbox.run`) is woken and publishes what is pending, oldest
  first, waiting for each publisher confirm, then marks the rows published. A crash or a broker
  outage between the commit and the confirm leaves the rows pending: the relay publishes them on
  its next pass (at-least-once; consumers deduplicate by the event id, the message id).
- On PostgreSQL, pending rows are claimed with `FOR UPDATE SKIP LOCKED`, so two replicas do not
  publish the same row; on SQLite there is one process.
- Published rows are kept for `keep_seconds`, then purged. The in-process bus of `make run`
  loses its messages with the process, so at start-up that shape publishes the rows of that
  window again (`republish_recent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import LargeBinary, delete, event, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.broker import BrokerUnavailable, Bus
from shared.db import table_of
from shared.events import Event
from shared.metrics import OUTBOX_PUBLISHED
from shared.timeutil import UtcDateTime, new_id, utcnow

logger = logging.getLogger("abl.outbox")
# Confirms awaited at once by one relay: enough to hide the round trip, few enough that a
# broker going away mid-batch leaves little published but unmarked (published again later).
PUBLISH_WINDOW = 32

# Session.info key: the outbox tables a session wrote to; their relays are woken when it
# commits.
_WRITTEN = "abl.outbox.written"
# The relays running in this process, by outbox table name.
_RELAYS: dict[str, set[Outbox]] = {}


class OutboxRecord(SQLModel):
    """The columns of every service's outbox table."""

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    message_id: str = Field(max_length=64)
    body: bytes = Field(sa_type=LargeBinary)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    # Null until the broker confirmed it; the relay's index.
    published_at: datetime | None = Field(default=None, sa_type=UtcDateTime, index=True)


def _wake_after_commit(session: Session) -> None:
    for table in session.info.pop(_WRITTEN, ()):
        for outbox in _RELAYS.get(table, ()):
            outbox.wake()


def _forget_on_rollback(session: Session, _transaction: object) -> None:
    session.info.pop(_WRITTEN, None)


_listening = False


def _listen_once() -> None:
    # Registered on first use, not at import: importing this module does nothing.
    global _listening
    if not _listening:
        event.listen(Session, "after_commit", _wake_after_commit)
        event.listen(Session, "after_soft_rollback", _forget_on_rollback)
        _listening = True


class Message(Protocol):
    """What an outbox carries: an event for the webhooks, a registry change for the copies."""

    @property
    def id(self) -> str: ...

    def encode(self) -> bytes: ...


def rows(events: Sequence[Message]) -> list[dict[str, object]]:
    """Outbox rows of `events`, for an INSERT into any service's outbox table."""
    now = utcnow()
    return [
        {
            "id": new_id(),
            "message_id": e.id,
            "body": e.encode(),
            "created_at": now,
            "published_at": None,
        }
        for e in events
    ]


def mark_written(session: Session, table: str) -> None:
    """Wake `table`'s relay when `session` commits (a caller that inserted rows itself, e.g.
    from a mapper event)."""
    _listen_once()
    session.info.setdefault(_WRITTEN, set()).add(table)


class Outbox:
    def __init__(
        self,
        model: type[OutboxRecord],
        sessions: async_sessionmaker[AsyncSession],
        bus: Bus,
        queue: str | Sequence[str],
        *,
        service: str,
        poll_seconds: float = 1.0,
        keep_seconds: float = 3600.0,
        batch: int = 500,
        per_message: int = 1,
    ) -> None:
        _listen_once()
        self.model = model
        self.table = table_of(model)
        self.sessions = sessions
        self.bus = bus
        # Each row goes to every queue named (one per consuming service) before it is marked.
        self.queues = (queue,) if isinstance(queue, str) else tuple(queue)
        self.service = service
        self.poll_seconds = poll_seconds
        self.keep_seconds = keep_seconds
        self.batch = batch
        # Rows per message: above 1, up to that many bodies travel as one `{"events": [...]}`
        # (for consumers that read `shared.events.decode_events`), one publish for many rows.
        self.per_message = per_message
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def write(self, session: AsyncSession, events: Sequence[Event]) -> None:
        """Add `events` to the caller's transaction; they are published once it commits."""
        if not events:
            return
        await session.exec(self.table.insert(), params=rows(events))
        mark_written(session.sync_session, self.table.name)

    async def publish_pending(self) -> int:
        """Publish pending rows until none is left; returns how many were confirmed."""
        total = 0
        while True:
            published = await self._publish_batch()
            total += published
            if published < self.batch:
                return total

    async def _publish_batch(self) -> int:
        table = self.table
        async with self.sessions() as session, session.begin():
            rows = (
                await session.exec(
                    select(table.c.id, table.c.message_id, table.c.body)
                    .where(table.c.published_at.is_(None))
                    .order_by(table.c.id)
                    .limit(self.batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            done: list[uuid.UUID] = []
            failures: list[Exception] = []
            step = self.per_message
            messages = [rows[i : i + step] for i in range(0, len(rows), step)]
            pending = iter(messages)

            async def publisher() -> None:
                # Messages leave in order (each publisher takes the next one as it goes), with
                # up to PUBLISH_WINDOW confirms awaited at once instead of one after the other.
                for message in pending:
                    if failures:
                        return
                    body, message_id = self._message(message)
                    try:
                        for queue in self.queues:
                            await self.bus.publish(queue, body, message_id=message_id)
                    except Exception as exc:  # the broker's; the rows stay pending
                        failures.append(exc)
                        return
                    done.extend(row_id for row_id, _, _ in message)

            await asyncio.gather(*(publisher() for _ in range(min(PUBLISH_WINDOW, len(messages)))))
            # What was confirmed is marked (and committed) even when another publish failed:
            # the rest stays pending for the next pass.
            if done:
                await session.exec(
                    update(table).where(table.c.id.in_(done)).values(published_at=utcnow())
                )
        OUTBOX_PUBLISHED.labels(self.service).inc(len(done))
        if failures:
            raise failures[0]
        return len(done)

    def _message(self, rows: Sequence[Any]) -> tuple[bytes, str]:
        if self.per_message == 1:
            _, message_id, body = rows[0]
            return body, message_id
        body = b'{"events":[' + b",".join(row[2] for row in rows) + b"]}"
        return body, f"{rows[0][1]}+{len(rows) - 1}"

    async def purge(self, now: datetime | None = None) -> None:
        cutoff = (now or utcnow()) - timedelta(seconds=self.keep_seconds)
        async with self.sessions() as session, session.begin():
            await session.exec(delete(self.table).where(self.table.c.published_at < cutoff))

    async def republish_recent(self) -> None:
        """The in-process bus lost what it held with the last process: publish again what was
        published within `keep_seconds` (consumers deduplicate by event id)."""
        async with self.sessions() as session, session.begin():
            await session.exec(
                update(self.table)
                .where(self.table.c.published_at.is_not(None))
                .values(published_at=None)
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Publish after every commit that wrote events, and every `poll_seconds` in any case
        (rows another replica wrote, or left after a failed publish)."""
        _RELAYS.setdefault(self.table.name, set()).add(self)
        try:
            await self._run(stop)
        finally:
            _RELAYS[self.table.name].discard(self)

    async def _run(self, stop: asyncio.Event) -> None:
        purge_every = max(60.0, self.poll_seconds)
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.publish_pending()
                if loop.time() - last_purge > purge_every:
                    await self.purge()
                    last_purge = loop.time()
            except BrokerUnavailable as exc:
                logger.warning("outbox of %s waits for the broker: %s", self.service, exc)
            except Exception:
                logger.exception("outbox of %s: publish pass failed; retrying", self.service)
            with contextlib.suppress(TimeoutError):
                waiter = asyncio.create_task(self._wake.wait())
                stopper = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait(
                        {waiter, stopper},
                        timeout=self.poll_seconds,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiter.cancel()
                    stopper.cancel()
        # A last pass: what was committed before the stop goes out before the process does.
        with contextlib.suppress(Exception):
            await self.publish_pending()
