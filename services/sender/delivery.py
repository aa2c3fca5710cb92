"""One SMTP transaction through a tenant's server, over a pooled connection.

Each server has its own pool (at most `ABL_SENDER_CONNECTIONS_PER_SERVER` connections), so a
slow server holds up only its own jobs; an open connection is reused for the server's next job.
A server whose provider limits messages per minute (`SmtpCredentials.per_minute`) also has a
`MinuteLimit`: the dispatcher spaces its jobs, and this holds the limit when they arrive in a
burst anyway (a backlog after an outage, redeliveries).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

import aiosmtplib

from services.sender import domain
from services.sender.domain import Stage, Verdict
from services.sender.message import build_wire
from shared import addresses
from shared.messages import Outcome, SendJob, SmtpCredentials
from shared.settings import SenderSettings
from shared.smtp_tls import smtp_client

CANCELED_BEFORE_SENDING = "canceled before sending"


@dataclass
class Attempt:
    verdict: Verdict
    code: int | None = None
    reply: str | None = None


@dataclass
class _Idle:
    client: aiosmtplib.SMTP
    fingerprint: str
    since: float


@dataclass
class MinuteSlot:
    """One send's place in its server's minute; one that sent nothing gives its place back."""

    counted: bool = True

    def nothing_sent(self) -> None:
        self.counted = False


class MinuteLimit:
    """At most `limit` sends of one server in any `period` seconds, in this process
    (`domain.minute_wait`). Per process: the dispatcher already releases a server's jobs no
    faster than its limit (one every 60 / limit seconds), whichever sender takes them; this
    bound holds when released jobs pile up in one sender (a burst after a broker restart)."""

    def __init__(self, limit: int, period: float = 60.0) -> None:
        self.limit = limit
        self.period = period
        self.ends: deque[float] = deque()
        self.in_flight = 0
        self.changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[MinuteSlot]:
        async with self.changed:
            while True:
                now = time.monotonic()
                while self.ends and self.ends[0] <= now - self.period:
                    self.ends.popleft()
                wait = domain.minute_wait(self.ends, self.in_flight, now, self.limit, self.period)
                if wait == 0.0:
                    break
                # Woken by a send that ends, or when the oldest one leaves the window.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), timeout=wait)
            self.in_flight += 1
        use = MinuteSlot()
        try:
            yield use
        finally:
            async with self.changed:
                self.in_flight -= 1
                if use.counted:
                    self.ends.append(time.monotonic())
                self.changed.notify_all()


@dataclass
class ServerConnections:
    slots: asyncio.Semaphore
    idle: list[_Idle] = field(default_factory=list)
    minute: MinuteLimit | None = None


def fingerprint(credentials: SmtpCredentials) -> str:
    # Changed credentials must not reuse a session opened with the old ones; nor may a session
    # opened with an access token outlive it (a revoked grant must stop sending soon).
    raw = "\0".join(
        (
            credentials.host,
            str(credentials.port),
            credentials.security,
            credentials.username,
            credentials.auth,
            credentials.password,
            credentials.access_token or "",
        )
    )
    return hashlib.sha256(raw.encode()).hexdigest()


async def authenticate(client: aiosmtplib.SMTP, credentials: SmtpCredentials) -> None:
    """AUTH with the password, or SASL XOAUTH2 with the access token: base64("user=" user
    "\x01auth=Bearer " token "\x01\x01"). A refused token answers a 334 challenge holding a
    JSON error (`{"status":"401",...}`), which aiosmtplib answers with an empty line to get the
    final 535: either way the refusal arrives as SMTPAuthenticationError."""
    if credentials.auth == "xoauth2":
        if not credentials.access_token:
            raise aiosmtplib.SMTPAuthenticationError(535, "no access token for this server")
        await client.auth_xoauth2(credentials.username, credentials.access_token)
    else:
        await client.login(credentials.username, credentials.password)


class Deliverer:
    def __init__(self, settings: SenderSettings, *, minute_seconds: float = 60.0) -> None:
        self.settings = settings
        self.pools: dict[uuid.UUID, ServerConnections] = {}
        # The length of a provider's "minute"; only tests shorten it.
        self.minute_seconds = minute_seconds

    def _pool(self, server_id: uuid.UUID, credentials: SmtpCredentials) -> ServerConnections:
        pool = self.pools.get(server_id)
        if pool is None:
            limit = domain.connection_limit(
                credentials.host, self.settings.sender_connections_per_server
            )
            pool = ServerConnections(asyncio.Semaphore(limit))
            self.pools[server_id] = pool
        if credentials.per_minute is None:
            pool.minute = None
        elif pool.minute is None:
            pool.minute = MinuteLimit(credentials.per_minute, self.minute_seconds)
        else:
            pool.minute.limit = credentials.per_minute
        return pool

    def _take_idle(self, pool: ServerConnections, key: str) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        while pool.idle:
            idle = pool.idle.pop()
            fresh = now - idle.since < self.settings.sender_idle_seconds
            if fresh and idle.fingerprint == key and idle.client.is_connected:
                return idle.client
            idle.client.close()
        return None

    async def _open(self, credentials: SmtpCredentials) -> aiosmtplib.SMTP:
        last_error: Exception | None = None
        for address in await addresses.checked_addresses(
            credentials.host, credentials.port, allow_private=self.settings.allow_private_hosts
        ):
            client = smtp_client(
                str(address),
                credentials.host,
                credentials.port,
                implicit_tls=credentials.security == "tls",
                timeout=self.settings.sender_command_timeout_seconds,
            )
            try:
                await client.connect()
            except aiosmtplib.SMTPConnectError as exc:
                last_error = exc
                continue
            try:
                await client.ehlo()
                if credentials.security == "starttls":
                    if not client.supports_extension("starttls"):
                        raise aiosmtplib.SMTPNotSupported("the server stopped offering STARTTLS")
                    await client.starttls()
                    await client.ehlo()
            except BaseException:
                client.close()
                raise
            return client
        assert last_error is not None
        raise last_error

    async def deliver(
        self,
        job: SendJob,
        credentials: SmtpCredentials,
        now: datetime,
        canceled: Callable[[], bool] = lambda: False,
    ) -> Attempt:
        pool = self._pool(job.server_id, credentials)
        key = fingerprint(credentials)
        try:
            # Built once per attempt, and the same bytes on every attempt of the email.
            payload = build_wire(
                job.content,
                from_email=credentials.from_email,
                from_name=credentials.from_name,
                now=now,
            )
        except Exception as exc:
            # Intake refuses what cannot be encoded; should something still slip through, the
            # email ends `failed` with the reason instead of bouncing between queues.
            return Attempt(
                Verdict(Outcome.failed, False, reason="the message cannot be built"),
                None,
                f"the message cannot be built: {type(exc).__name__}",
            )
        minute = pool.minute.slot() if pool.minute else contextlib.nullcontext(MinuteSlot())
        async with minute as place, pool.slots:
            if canceled():
                # Canceled while it waited for a connection to its server: nothing was sent.
                place.nothing_sent()
                return Attempt(Verdict(Outcome.failed, False, reason=CANCELED_BEFORE_SENDING))
            client = self._take_idle(pool, key)
            stage = Stage.connect
            reusable = False
            try:
                if client is None:
                    client = await self._open(credentials)
                    stage = Stage.auth
                    await authenticate(client, credentials)
                stage = Stage.mail
                await client.mail(credentials.from_email)
                stage = Stage.rcpt
                await client.rcpt(job.content.to)
                stage = Stage.data
                response = await client.execute_command(b"DATA")
                if response.code != 354:
                    reusable = True
                    return Attempt(
                        domain.classify_reply(stage, response.code, response.message),
                        response.code,
                        response.message,
                    )
                stage = Stage.end_of_data
                assert client.protocol is not None
                client.protocol.write(payload)
                response = await client.protocol.read_response(
                    timeout=self.settings.sender_data_timeout_seconds
                )
                reusable = True
                return Attempt(
                    domain.classify_reply(stage, response.code, response.message),
                    response.code,
                    response.message,
                )
            except aiosmtplib.SMTPResponseException as exc:
                reusable = stage in (Stage.mail, Stage.rcpt)
                return Attempt(
                    domain.classify_reply(stage, exc.code, exc.message), exc.code, exc.message
                )
            except addresses.ForbiddenAddress:
                return Attempt(
                    Verdict(Outcome.retry, False, reason="no usable address"),
                    None,
                    "the host resolves to a forbidden address",
                )
            except aiosmtplib.SMTPNotSupported as exc:
                return Attempt(Verdict(Outcome.retry, False, reason="no STARTTLS"), None, str(exc))
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                return Attempt(domain.classify_lost_line(stage), None, type(exc).__name__)
            finally:
                if client is not None:
                    reset = stage is not Stage.end_of_data  # an unfinished transaction
                    await self._put_back(pool, client, key, reusable, reset)

    async def _put_back(
        self,
        pool: ServerConnections,
        client: aiosmtplib.SMTP,
        key: str,
        reusable: bool,
        reset: bool,
    ) -> None:
        if reusable and client.is_connected:
            if reset:
                try:
                    await client.rset()
                except aiosmtplib.SMTPException:
                    client.close()
                    return
            pool.idle.append(_Idle(client, key, time.monotonic()))
        else:
            client.close()

    async def close(self) -> None:
        for pool in self.pools.values():
            for idle in pool.idle:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await asyncio.wait_for(idle.client.quit(), timeout=2)
                idle.client.close()
            pool.idle.clear()
