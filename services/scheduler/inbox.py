"""The mailbox reader: reads each sending mailbox's INBOX and turns what came back into
statuses, suppressions and canceled sequence emails.

It runs as a loop in the scheduler, not as a service of its own: everything it learns is
written to tables the scheduler owns (emails, suppressions), in the same transaction as the
event that caused it, and the work is small next to the SMTP side (one IMAP session per
mailbox per `ABL_INBOX_POLL_SECONDS`). What it needs from the registry (a mailbox's access) and
tells it (the last read, a `paused_bounces` pause) goes through a `MailboxSource`: the
registry's internal routes in the stack, its use cases in the one-process shape.

Replicas split the mailboxes: a mailbox is read by the replica that takes its lease (one
conditional UPDATE of its cursor's `due_at`), which then holds it until its next read is due;
the events' unique key keeps a read that slipped through anyway from counting twice.

Rules of reading: only INBOX, opened read-only (EXAMINE) and fetched with BODY.PEEK, so
nothing is marked read, moved or deleted; only UIDs above the last one seen, and everything
again when UIDVALIDITY changes (the event key, the notification's own Message-ID, makes that
safe). Each mailbox is read in a thread of the reader's own pool, under a time bound, so a
mailbox that hangs or refuses the login delays none of the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import imaplib
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import func, or_, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import (
    domain,
    events,
    feedback,
    lifecycle,
    repository,
    service,
    suppression,
    unsubscribe,
)
from services.scheduler.feedback import Feedback, Kind
from services.scheduler.lifecycle import Step
from services.scheduler.models import (
    Email,
    EmailStatus,
    MailboxCursor,
    MailboxEvent,
    SuppressionSource,
)
from shared import imap
from shared.db import insert_ignore_statement, table_of
from shared.errors import AppError
from shared.messages import CancelNotice, PollReputation
from shared.metrics import (
    BOUNCES,
    MAILBOX_MESSAGES,
    MAILBOX_POLLS,
    MAILBOX_UNAPPLIED,
    REPLIES,
)
from shared.settings import SchedulerSettings
from shared.timeutil import new_id, utcnow

logger = logging.getLogger("abl.scheduler.inbox")

FETCH_BATCH = 50
SOFT_BOUNCE_LIMIT = 3
SOFT_BOUNCE_WINDOW = timedelta(days=30)
# A bounce or reply can only follow a send; a canceled or suppressed email stays what it is.
AFTER_SEND = lifecycle.sources(Step.bounce)


@dataclass(frozen=True)
class MailboxRef:
    server_id: uuid.UUID
    tenant_id: uuid.UUID


@dataclass(frozen=True)
class Mailbox(MailboxRef):
    endpoint: imap.ImapEndpoint


@dataclass(frozen=True)
class Watcher:
    """One mailbox's IDLE connection: its thread's future, the event that stops it, and the
    access it logged in with."""

    future: asyncio.Future[bool]
    stop: threading.Event
    target: tuple[str, Mailbox]


def _access(target: tuple[str, Mailbox]) -> tuple[object, ...]:
    """What a watcher's login depends on. An OAuth server's access token is left out: a new
    one for the same grant changes nothing for a session already logged in."""
    address, box = target
    endpoint = box.endpoint
    secret = None if endpoint.auth is imap.ImapAuth.xoauth2 else endpoint.password
    return (
        address,
        endpoint.host,
        endpoint.port,
        endpoint.security,
        endpoint.username,
        endpoint.auth,
        secret,
    )


class AccessUnavailable(Exception):
    """The registry could not give a mailbox's access now; the mailbox waits for its next
    round."""


class AwaitingResult(Exception):
    """A bounce or reply names an email whose send result is not applied yet (`scheduled`):
    the message is read again on the next round instead of being recorded now, when the
    bounce or reply could not change the email's status and would never be applied again."""


class MailboxSource(Protocol):
    """What the reader needs from the registry, and what it tells it."""

    async def mailboxes(self) -> Sequence[MailboxRef]:
        """The servers that have a mailbox to read."""

    async def endpoint(
        self, server_id: uuid.UUID, rejected: str | None = None
    ) -> imap.ImapEndpoint | None:
        """The mailbox's access (with its password, or an OAuth server's access token); None
        when it has none any more. `rejected`: the SHA-256 of an access token the IMAP server
        refused, for a new one. Raises `AccessUnavailable` when the registry cannot answer."""

    async def report(
        self,
        server_id: uuid.UUID,
        at: datetime,
        error: str | None,
        reputation: PollReputation | None = None,
    ) -> None:
        """The last read's time and error, and the server's bounce and complaint rates as the
        reader counted them then (None if it could not), shown on the server."""

    async def pause(self, server_id: uuid.UUID, reason: str) -> None:
        """Pause the server (`paused_bounces`): the bounce-rate guard said so."""


# A lease outlives the read it covers (bounded by `inbox_timeout_seconds`) by this factor, so
# that a replica that died mid-read hands the mailbox on soon after.
LEASE_FACTOR = 2.0
# The next read is due a little before a whole interval, so the replica that just read a
# mailbox finds it due again on its next round (rounds start `inbox_poll_seconds` apart).
DUE_FACTOR = 0.9


def fetch_new(
    address: str, endpoint: imap.ImapEndpoint, uidvalidity: int, last_uid: int, timeout: float
) -> tuple[int, list[tuple[int, bytes]]]:
    """(UIDVALIDITY, [(uid, message)]) of INBOX's messages after `last_uid`. Blocking."""
    client = imap.connect(address, endpoint, timeout)
    try:
        typ, _ = client.select("INBOX", readonly=True)
        if typ != "OK":
            raise imaplib.IMAP4.error("INBOX cannot be selected")
        _, values = client.response("UIDVALIDITY")
        current = int(values[0]) if values and values[0] else 0
        if current != uidvalidity:
            last_uid = 0  # a new mailbox as far as UIDs go: read it all again
        _, found = client.uid("SEARCH", None, f"UID {last_uid + 1}:*")  # type: ignore[arg-type]
        # "n:*" also names the last message when every UID is below n: filter.
        uids = sorted(int(u) for u in (found[0] or b"").split() if int(u) > last_uid)
        messages: list[tuple[int, bytes]] = []
        for start in range(0, len(uids), FETCH_BATCH):
            batch = ",".join(str(u) for u in uids[start : start + FETCH_BATCH])
            _, data = client.uid("FETCH", batch, "(UID BODY.PEEK[])")
            for item in data:
                if isinstance(item, tuple):
                    meta, body = item
                    uid = int(meta.split(b"UID ")[1].split()[0].rstrip(b")"))
                    messages.append((uid, body))
        return current, sorted(messages)
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


def watch_idle(
    address: str,
    endpoint: imap.ImapEndpoint,
    timeout: float,
    renew_seconds: float,
    stop: threading.Event,
    arrived: Callable[[], None],
) -> bool:
    """Sit in IMAP IDLE on INBOX (read-only) and call `arrived` whenever the server announces
    a new message, until `stop` is set; False at once when the server does not advertise IDLE.
    Blocking: one thread of the reader's IDLE pool."""
    client = imap.connect(address, endpoint, timeout)
    try:
        if not imap.supports_idle(client):
            return False
        typ, _ = client.select("INBOX", readonly=True)
        if typ != "OK":
            raise imaplib.IMAP4.error("INBOX cannot be selected")
        while not stop.is_set():
            if imap.idle_once(client, renew_seconds, stop):
                arrived()
        return True
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


class MailboxReader:
    def __init__(
        self,
        settings: SchedulerSettings,
        sessions: async_sessionmaker[AsyncSession],
        source: MailboxSource,
        *,
        allow_private: bool = False,
        allowed_ports: tuple[int, ...] = imap.DEFAULT_IMAP_PORTS,
        broadcast: Callable[[CancelNotice], Awaitable[None]] | None = None,
        paused: Callable[[uuid.UUID], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        # Told of each pause the registry took, so this scheduler's copy of the server follows
        # at once (`RegistryCopy.refresh_server`).
        self.paused = paused
        # Tells the senders of canceled emails whose jobs are out (`service.broadcast_cancel`).
        self.broadcast = broadcast
        self.guard = domain.BounceGuard(
            window=settings.bounce_window,
            pause_ratio=settings.bounce_pause_ratio,
            complaint_ratio=settings.complaint_pause_ratio,
            min_sent=settings.bounce_min_sent,
        )
        self.sessions = sessions
        self.source = source
        self.allow_private = allow_private
        self.allowed_ports = allowed_ports
        self.keys = unsubscribe.keys_from(settings.unsubscribe_secrets)
        # Its own threads: a mailbox that hangs holds one of these, never the event loop's
        # default pool, and never more than `inbox_concurrency` of them.
        self.pool = ThreadPoolExecutor(
            max_workers=settings.inbox_concurrency, thread_name_prefix="abl-inbox"
        )
        self.slots = asyncio.Semaphore(settings.inbox_concurrency)
        # IMAP IDLE: one thread and connection per watched mailbox, in a pool of their own.
        self.idle_pool = ThreadPoolExecutor(
            max_workers=max(1, settings.inbox_idle_max), thread_name_prefix="abl-idle"
        )
        # One stop event per watcher: a mailbox no longer listed, or whose access changed, has
        # its connection closed without touching the others'.
        self.watching: dict[uuid.UUID, Watcher] = {}
        self.no_idle: set[uuid.UUID] = set()  # servers that do not advertise IDLE
        self.targets: dict[uuid.UUID, tuple[str, Mailbox]] = {}
        self.arrived: set[uuid.UUID] = set()
        self.wake = asyncio.Event()

    def close(self) -> None:
        for watcher in self.watching.values():
            watcher.stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.idle_pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Read the due mailboxes every `inbox_poll_seconds`, and a watched mailbox as soon as
        IDLE says a message arrived, until `stop` is set."""
        while not stop.is_set():
            try:
                arrived, self.arrived = self.arrived, set()
                await self._make_due(arrived)
                read = await self.poll_all()
                self._watch([server_id for server_id, error in read.items() if error is None])
            except Exception:
                logger.exception("reading the mailboxes failed; trying again")
            self.wake.clear()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
            await asyncio.wait(
                waits, timeout=self.settings.inbox_poll_seconds, return_when="FIRST_COMPLETED"
            )
            for waiting in waits:
                waiting.cancel()

    async def _make_due(self, server_ids: set[uuid.UUID]) -> None:
        """Due now: a message arrived. (Should another replica be reading the mailbox at this
        moment, its lease is cut short and the mailbox may be read twice at once; the events'
        unique key still counts each message once.)"""
        if not server_ids:
            return
        table = table_of(MailboxCursor)
        async with self.sessions() as session, session.begin():
            await session.exec(
                update(table)
                .where(table.c.server_id.in_(sorted(server_ids)))
                .values(due_at=utcnow())
            )

    def _watch(self, server_ids: list[uuid.UUID]) -> None:
        """Keep an IDLE connection on each of these mailboxes (read just now without error),
        up to `inbox_idle_max`; a server that does not advertise IDLE is polled only."""
        loop = asyncio.get_running_loop()
        for server_id in server_ids:
            running = self.watching.get(server_id)
            if running is not None and not running.future.done():
                continue
            if server_id in self.no_idle or server_id not in self.targets:
                continue
            live = sum(not w.future.done() for w in self.watching.values())
            if live >= self.settings.inbox_idle_max:
                return
            address, box = self.targets[server_id]
            stop = threading.Event()

            def arrived(server_id: uuid.UUID = server_id) -> None:
                loop.call_soon_threadsafe(self._arrived, server_id)

            future = loop.run_in_executor(
                self.idle_pool,
                watch_idle,
                address,
                box.endpoint,
                self.settings.inbox_timeout_seconds,
                self.settings.inbox_idle_seconds,
                stop,
                arrived,
            )
            future.add_done_callback(functools.partial(self._watch_ended, server_id, stop))
            self.watching[server_id] = Watcher(future, stop, (address, box))

    def _unwatch(self, server_id: uuid.UUID) -> None:
        """Close the mailbox's IDLE connection (its thread sees the event within a second)."""
        watcher = self.watching.pop(server_id, None)
        if watcher is not None:
            watcher.stop.set()

    def _forget(self, listed: set[uuid.UUID]) -> None:
        """Stop watching the mailboxes no longer listed (server deleted, IMAP removed)."""
        for server_id in [s for s in self.watching if s not in listed]:
            self._unwatch(server_id)
        for server_id in [s for s in self.targets if s not in listed]:
            del self.targets[server_id]
        self.no_idle &= listed

    def _arrived(self, server_id: uuid.UUID) -> None:
        self.arrived.add(server_id)
        self.wake.set()

    def _watch_ended(
        self, server_id: uuid.UUID, stop: threading.Event, done: asyncio.Future[bool]
    ) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is None and done.result() is False:
            self.no_idle.add(server_id)
        elif error is not None and not stop.is_set():
            # Started again after the mailbox's next good read; polling covers the gap.
            logger.info("IDLE on the mailbox of server %s ended: %s", server_id, _describe(error))

    async def poll_all(self) -> dict[uuid.UUID, str | None]:
        """Read every mailbox that is due and that no other replica holds, concurrently; each
        one read's error (or None). Mailboxes not read this time are not in the answer."""
        for server_id, reason in (await self.pending_pauses()).items():
            await self._pause(server_id, reason)
        boxes = await self.source.mailboxes()
        self._forget({box.server_id for box in boxes})
        results = await asyncio.gather(*(self._poll_bounded(box) for box in boxes))
        return {
            box.server_id: error for box, (read, error) in zip(boxes, results, strict=True) if read
        }

    async def _claim(self, box: MailboxRef) -> bool:
        """Take the mailbox's lease if it is due and free: one conditional UPDATE, so of two
        replicas asking at once exactly one gets it."""
        now = utcnow()
        table = table_of(MailboxCursor)
        async with self.sessions() as session, session.begin():
            await session.exec(
                insert_ignore_statement(
                    session,
                    table,
                    {
                        "server_id": box.server_id,
                        "tenant_id": box.tenant_id,
                        "uidvalidity": 0,
                        "last_uid": 0,
                    },
                )
            )
            lease = timedelta(seconds=self.settings.inbox_timeout_seconds * LEASE_FACTOR)
            taken = await session.exec(
                update(table)
                .where(
                    table.c.server_id == box.server_id,
                    or_(table.c.due_at.is_(None), table.c.due_at <= now),
                )
                .values(due_at=now + lease)
            )
            return bool(taken.rowcount)

    async def _next_due(self, box: MailboxRef) -> None:
        table = table_of(MailboxCursor)
        due = utcnow() + timedelta(seconds=self.settings.inbox_poll_seconds * DUE_FACTOR)
        async with self.sessions() as session, session.begin():
            await session.exec(
                update(table).where(table.c.server_id == box.server_id).values(due_at=due)
            )

    async def _poll_bounded(self, ref: MailboxRef) -> tuple[bool, str | None]:
        """(read, error): whether this replica read the mailbox, and what went wrong."""
        async with self.slots:
            if not await self._claim(ref):
                return False, None
            error: str | None
            try:
                async with asyncio.timeout(self.settings.inbox_timeout_seconds):
                    listed = await self._read(ref)
                if not listed:
                    return False, None  # its IMAP access was removed since it was listed
                error = None
                MAILBOX_POLLS.labels("ok").inc()
            except TimeoutError:
                error = "timeout: the IMAP server did not answer in time"
                MAILBOX_POLLS.labels("timeout").inc()
            except AccessUnavailable:
                # Not the mailbox's fault: nothing to report on the server; tried next round.
                logger.warning("no access to the mailbox of server %s now", ref.server_id)
                MAILBOX_POLLS.labels("failed").inc()
                return True, "the registry did not give the mailbox access"
            except (imaplib.IMAP4.error, OSError) as exc:
                error = _describe(exc)
                MAILBOX_POLLS.labels("failed").inc()
            except Exception:
                logger.exception("reading mailbox of server %s failed", ref.server_id)
                error = "internal error while reading the mailbox"
                MAILBOX_POLLS.labels("failed").inc()
            finally:
                with contextlib.suppress(Exception):
                    await self._next_due(ref)
            reputation = await self._reputation(ref.server_id)
            try:
                await self.source.report(ref.server_id, utcnow(), error, reputation)
            except Exception:
                logger.warning("could not record the poll of server %s", ref.server_id)
            return True, error

    async def _read(self, ref: MailboxRef) -> bool:
        """Read the mailbox; False when it has no access any more. An access token the IMAP
        server refuses (expired early, revoked) is exchanged for a new one once, as senders
        do: the registry refreshes it once for all its readers and senders."""
        endpoint = await self.source.endpoint(ref.server_id)
        if endpoint is None:
            self._unwatch(ref.server_id)
            self.targets.pop(ref.server_id, None)
            return False
        try:
            await self.poll(Mailbox(ref.server_id, ref.tenant_id, endpoint))
        except imap.LoginRefused:
            if endpoint.auth is not imap.ImapAuth.xoauth2 or not endpoint.password:
                raise
            endpoint = await self.source.endpoint(ref.server_id, endpoint.token_sha256)
            if endpoint is None:
                return False
            await self.poll(Mailbox(ref.server_id, ref.tenant_id, endpoint))
        return True

    async def poll(self, box: Mailbox) -> int:
        """Read one mailbox's new messages and apply them; how many were new events."""
        target = await imap.checked_address(
            box.endpoint, allow_private=self.allow_private, allowed_ports=self.allowed_ports
        )
        if isinstance(target, imap.ImapCheck):
            raise OSError(target.detail)
        if self.settings.inbox_idle_max:
            self.targets[box.server_id] = (target, box)
            watcher = self.watching.get(box.server_id)
            if watcher is not None and _access(watcher.target) != _access((target, box)):
                self._unwatch(box.server_id)  # logged in with the old access: started again
        async with self.sessions() as session:
            cursor = await session.get(MailboxCursor, box.server_id)
            validity, last = (cursor.uidvalidity, cursor.last_uid) if cursor else (0, 0)
        loop = asyncio.get_running_loop()
        timeout = self.settings.inbox_timeout_seconds * 0.9
        current, messages = await loop.run_in_executor(
            self.pool, fetch_new, target, box.endpoint, validity, last, timeout
        )
        verdicts = [(uid, feedback.classify(raw)) for uid, raw in messages]
        MAILBOX_MESSAGES.inc(len(verdicts))
        applied = 0
        reason = None
        notices: list[CancelNotice] = []
        async with self.sessions() as session, session.begin():
            row = await session.get(MailboxCursor, box.server_id) or MailboxCursor(
                server_id=box.server_id, tenant_id=box.tenant_id
            )
            row.uidvalidity = current
            row.last_uid = max(
                [uid for uid, _ in messages], default=0 if current != validity else last
            )
            session.add(row)
            # The cursor is written first: on SQLite that write opens the transaction (and
            # takes the write lock), so the messages' savepoints nest inside it.
            await session.flush()
            for uid, verdict in verdicts:
                try:
                    applied += await self._apply_one(session, box, uid, verdict, notices)
                except AwaitingResult:
                    # This message and the ones after it are read again next round. Bounded:
                    # an email left `scheduled` is settled by the sweep (`sweep_after_seconds`).
                    row.last_uid = uid - 1
                    logger.info(
                        "mailbox of server %s: UID %s names an email awaiting its send result; "
                        "read again next round",
                        box.server_id,
                        uid,
                    )
                    break
            if any(v.kind in (Kind.hard_bounce, Kind.complaint) for _, v in verdicts):
                reason = await self._over_threshold(session, box.server_id)
            if reason is not None:
                # Kept until the registry takes it, by whichever replica, process or round.
                row.pending_pause = reason[:512]
                row.pending_pause_at = utcnow()
        if self.broadcast is not None:
            for notice in notices:
                await self.broadcast(notice)
        if reason is not None:
            logger.warning("pausing server %s: %s", box.server_id, reason[:512])
            await self._pause(box.server_id, reason[:512])
        return applied

    async def pending_pauses(self) -> dict[uuid.UUID, str]:
        """The pauses the guard decided (on any replica, before any restart) that the registry
        has not taken yet: server id → reason. The verdict is only computed again when the
        mailbox brings another hard bounce or complaint, so these are asked for every round."""
        async with self.sessions() as session:
            rows = await session.exec(
                select(MailboxCursor.server_id, MailboxCursor.pending_pause).where(
                    col(MailboxCursor.pending_pause).is_not(None)
                )
            )
            return {server_id: reason for server_id, reason in rows.all() if reason}

    async def _pause(self, server_id: uuid.UUID, reason: str) -> None:
        """Ask the registry to pause the server; once it has (or the server is gone), the
        pending pause is cleared. Two replicas asking at once pause it once (the registry's
        conditional UPDATE)."""
        try:
            await self.source.pause(server_id, reason)
        except Exception as exc:
            logger.warning(
                "pause of server %s not taken by the registry (%s); tried again next round",
                server_id,
                type(exc).__name__,
            )
            return
        table = table_of(MailboxCursor)
        try:
            async with self.sessions() as session, session.begin():
                # Only the reason that was taken: a newer verdict written meanwhile stays.
                await session.exec(
                    update(table)
                    .where(table.c.server_id == server_id, table.c.pending_pause == reason)
                    .values(pending_pause=None, pending_pause_at=None)
                )
        except Exception as exc:  # asked again next round; the registry's pause is idempotent
            logger.warning(
                "pending pause of server %s not cleared (%s)", server_id, type(exc).__name__
            )
        if self.paused is not None:
            try:
                await self.paused(server_id)
            except Exception as exc:  # the change still arrives by the bus
                logger.warning(
                    "copy of paused server %s not refreshed (%s)", server_id, type(exc).__name__
                )

    async def _reputation(self, server_id: uuid.UUID) -> PollReputation | None:
        """The server's bounce and complaint rates over its last `bounce_window` sent emails,
        as the guard and `GET /v1/servers/{id}/warmup` count them; None if they cannot be
        counted now (the report goes without them, and the registry keeps the last ones)."""
        try:
            async with self.sessions() as session:
                counts = await repository.bounce_counts(session, server_id, self.guard.window)
        except Exception as exc:
            logger.warning(
                "bounce rates of server %s not counted (%s)", server_id, type(exc).__name__
            )
            return None
        return PollReputation(
            sample=counts.sent,
            bounce_rate=domain.ratio(counts.hard, counts.sent),
            complaint_rate=domain.ratio(counts.complaints, counts.sent),
        )

    async def _over_threshold(self, session: AsyncSession, server_id: uuid.UUID) -> str | None:
        """The guard's verdict on the server's last `bounce_window` sent emails."""
        counts = await repository.bounce_counts(session, server_id, self.guard.window)
        return domain.bounce_verdict(counts.sent, counts.hard, counts.complaints, self.guard)

    async def _apply_one(
        self,
        session: AsyncSession,
        box: Mailbox,
        uid: int,
        verdict: Feedback,
        notices: list[CancelNotice],
    ) -> int:
        """Apply one message in a savepoint of the read's transaction: a message the database
        refuses is skipped (and logged, without its content) instead of failing the whole read
        for ever, since the cursor would never move past it."""
        kept = len(notices)
        try:
            async with session.begin_nested():
                return await self.apply(session, box, verdict, notices)
        except AwaitingResult:
            raise
        except Exception as exc:
            del notices[kept:]  # those cancels were rolled back with the savepoint
            MAILBOX_UNAPPLIED.inc()
            logger.error(
                "message UID %s (%s) of the mailbox of server %s could not be applied (%s); "
                "skipped",
                uid,
                verdict.kind.value,
                box.server_id,
                type(exc).__name__,
            )
            return 0

    async def apply(
        self,
        session: AsyncSession,
        box: Mailbox,
        verdict: Feedback,
        notices: list[CancelNotice] | None = None,
    ) -> int:
        """Record and act on one message; the cancels of jobs already out are added to
        `notices`, to broadcast after the commit."""
        if verdict.kind is Kind.other:
            return 0
        now = utcnow()
        emails = await _emails_named(session, box.tenant_id, verdict)
        if verdict.kind in (Kind.hard_bounce, Kind.reply) and any(
            e.status == EmailStatus.scheduled for e in emails
        ):
            raise AwaitingResult
        address = emails[0].to.lower() if emails else (verdict.recipients or (None,))[0]
        inserted = await session.exec(
            insert_ignore_statement(
                session,
                table_of(MailboxEvent),
                {
                    "id": new_id(),
                    "tenant_id": box.tenant_id,
                    "server_id": box.server_id,
                    "key": verdict.key[:255],
                    "kind": verdict.kind.value,
                    "email_id": emails[0].id if emails else None,
                    "address": address,
                    "status": verdict.status,
                    "at": now,
                },
            )
        )
        if not inserted.rowcount:
            return 0  # read before (a second replica, or a UIDVALIDITY change)
        if verdict.kind is Kind.unsubscribe and verdict.token:
            with contextlib.suppress(AppError):  # tampered or used: nothing more to do
                await unsubscribe.use(session, self.keys, verdict.token, now, via="mailto")
            return 1
        if verdict.kind is Kind.auto_reply:
            return 1  # recorded, not a reply: an out-of-office does not stop a sequence
        if not emails:
            # Names none of this tenant's emails (an older mailbox's mail, another sender's
            # bounce): kept on record, acted on never.
            return 1
        changed = []
        for email in emails:
            status = EmailStatus(email.status)
            if verdict.kind is Kind.hard_bounce and lifecycle.can(status, Step.bounce):
                email.status = lifecycle.after(status, Step.bounce)
                email.bounce_status = verdict.status
                email.bounce_diagnostic = verdict.diagnostic
                changed.append(email)
            elif verdict.kind is Kind.soft_bounce:
                email.bounce_status = verdict.status
                email.bounce_diagnostic = verdict.diagnostic
            elif verdict.kind is Kind.reply and lifecycle.can(status, Step.reply):
                email.status = lifecycle.after(status, Step.reply)
                email.replied_at = now
                changed.append(email)
            email.updated_at = now
            session.add(email)
            if verdict.kind in (Kind.hard_bounce, Kind.soft_bounce, Kind.reply):
                found = await _stop_sequence(session, email, now)
                if notices is not None:
                    notices.extend(found)
        # email.bounced / email.replied, in the transaction that sets the status.
        await events.write(session, events.feedback_events(changed, now))
        if verdict.kind is Kind.reply:
            REPLIES.inc()
            return 1
        BOUNCES.labels(
            {Kind.hard_bounce: "hard", Kind.soft_bounce: "soft"}.get(verdict.kind, "complaint")
        ).inc()
        if address is None:
            return 1
        if verdict.kind is Kind.complaint:
            source, reason = SuppressionSource.complaint, "complaint (ARF report)"
        elif verdict.kind is Kind.hard_bounce:
            source, reason = SuppressionSource.bounce, f"hard bounce {verdict.status or ''}"
        elif await _soft_bounces(session, box.tenant_id, address, now) >= SOFT_BOUNCE_LIMIT:
            source, reason = SuppressionSource.bounce, "3 soft bounces in 30 days"
        else:
            return 1
        await suppression.suppress_address(
            session, box.tenant_id, address, source, reason.strip(), now
        )
        return 1


async def _emails_named(
    session: AsyncSession, tenant_id: uuid.UUID, verdict: Feedback
) -> list[Email]:
    """Our emails a notification names: by Message-ID, or else the latest one sent to the
    failed recipient."""
    if verdict.email_ids:
        query = select(Email).where(
            Email.tenant_id == tenant_id, col(Email.id).in_(verdict.email_ids)
        )
        return list((await session.exec(query)).all())
    if not verdict.recipients:
        return []
    query = (
        select(Email)
        .where(
            Email.tenant_id == tenant_id,
            func.lower(Email.to) == verdict.recipients[0],
            col(Email.status).in_(AFTER_SEND),
        )
        .order_by(col(Email.sent_at).desc())
        .limit(1)
    )
    return list((await session.exec(query)).all())


async def _stop_sequence(session: AsyncSession, email: Email, now: datetime) -> list[CancelNotice]:
    """Cancel the sequence's other emails to the recipient: the queued ones in one statement,
    the scheduled ones (their jobs out) as the cancel route does; the notices to broadcast."""
    if email.sequence is None:
        return []
    table = table_of(Email)
    out = await session.exec(
        select(Email.id).where(
            Email.tenant_id == email.tenant_id,
            Email.sequence == email.sequence,
            func.lower(Email.to) == email.to.lower(),
            Email.status == EmailStatus.scheduled,
        )
    )
    notices = []
    for email_id in out.all():
        canceled = await service.stop(session, email.tenant_id, email_id, now)
        if canceled is not None and canceled[1] is not None:
            notices.append(canceled[1])
    await session.exec(
        update(table)
        .where(
            table.c.tenant_id == email.tenant_id,
            table.c.sequence == email.sequence,
            func.lower(table.c.to) == email.to.lower(),
            table.c.status.in_(lifecycle.sources(Step.stop_sequence)),
        )
        .values(status=lifecycle.target(Step.stop_sequence), updated_at=now)
    )
    return notices


async def _soft_bounces(
    session: AsyncSession, tenant_id: uuid.UUID, address: str, now: datetime
) -> int:
    query = select(func.count()).where(
        MailboxEvent.tenant_id == tenant_id,
        MailboxEvent.address == address,
        MailboxEvent.kind == Kind.soft_bounce.value,
        col(MailboxEvent.at) >= now - SOFT_BOUNCE_WINDOW,
    )
    return int((await session.exec(query)).one())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, imap.GrantGone):
        return (
            "the server's OAuth grant is gone (revoked or expired): reconnect the server with "
            "OAuth to read its mailbox"
        )
    if isinstance(exc, imap.LoginRefused):
        return str(exc)  # our own words: the server's could echo what was sent
    if isinstance(exc, imaplib.IMAP4.error):
        return "the IMAP server refused the login or the command"
    return f"could not read the mailbox ({type(exc).__name__})"
