"""What a sender needs from the other services, and how it gets it.

Two ports: `CredentialsSource` (a server's credentials, from the registry) and `JobStates` (is
this job still its email's attempt?, from the scheduler). In the stack they are HTTP clients of
the services' internal routes; in the one-process shape they are function calls, wired by
`services.app`. Either raises `DependencyUnavailable` when the other side cannot answer now: the
worker then waits and tries again, it does not fail the job.

Credentials live in memory only, for a short time (never past an OAuth access token's expiry);
concurrent look-ups of one server share one request (single flight), and so do the requests for
a new access token after an OAuth server refused one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import httpx

from shared.batching import Batches
from shared.errors import TransientMessageError
from shared.internal_client import get_model
from shared.messages import (
    HealthReport,
    JobRef,
    ResultsReport,
    SendableAnswer,
    SendableQuery,
    SendResult,
    SmtpCredentials,
)
from shared.timeutil import utcnow


class DependencyUnavailable(TransientMessageError):
    """The registry or the scheduler did not answer; the job waits, it has not failed."""

    code = "dependency_unavailable"


JobKey = tuple[uuid.UUID, uuid.UUID]  # (email_id, job_id)


class CredentialsSource(Protocol):
    async def credentials(self, server_id: uuid.UUID) -> SmtpCredentials | None:
        """The server's credentials, or None when it no longer exists."""

    def forget(self, server_id: uuid.UUID) -> None: ...

    async def refreshed(
        self, server_id: uuid.UUID, rejected: SmtpCredentials
    ) -> SmtpCredentials | None:
        """Credentials with another access token than `rejected`'s (an OAuth server refused
        it), or the server's current state when the registry could not get one."""

    async def report_auth_failure(self, server_id: uuid.UUID, reply: str) -> None: ...


class JobStates(Protocol):
    async def sendable(self, jobs: Iterable[JobKey]) -> set[uuid.UUID]:
        """The job ids, among `jobs`, that are still their email's current attempt."""

    async def report(self, result: SendResult) -> None:
        """Give a result to the scheduler directly (while the broker is away)."""


@dataclass
class _Cached:
    value: SmtpCredentials | None
    expires: float


def token_digest(token: str) -> str:
    """How a refused access token is named to the registry, without sending it back."""
    return hashlib.sha256(token.encode()).hexdigest()


# An access token is not handed to a job with less than this left: the SMTP session that uses
# it starts within seconds.
TOKEN_SAFETY_SECONDS = 30.0


class CachedCredentials:
    """A `CredentialsSource` in front of another: a short cache and one look-up per server at a
    time, however many jobs of that server arrive together."""

    def __init__(
        self,
        fetch: Callable[[uuid.UUID], Awaitable[SmtpCredentials | None]],
        report: Callable[[uuid.UUID, str], Awaitable[None]],
        ttl_seconds: float,
        refresh: Callable[[uuid.UUID, str], Awaitable[SmtpCredentials | None]] | None = None,
    ) -> None:
        self.fetch = fetch
        self.report = report
        self.refresh = refresh
        self.ttl = ttl_seconds
        self.cache: dict[uuid.UUID, _Cached] = {}
        self.in_flight: dict[uuid.UUID, asyncio.Future[SmtpCredentials | None]] = {}

    def _expiry(self, value: SmtpCredentials) -> float:
        expires = time.monotonic() + self.ttl
        if value.access_token_expires_at is not None:
            left = (value.access_token_expires_at - utcnow()).total_seconds()
            expires = min(expires, time.monotonic() + left - TOKEN_SAFETY_SECONDS)
        return expires

    async def credentials(self, server_id: uuid.UUID) -> SmtpCredentials | None:
        cached = self.cache.get(server_id)
        if cached is not None and cached.expires > time.monotonic():
            return cached.value
        return await self._single_flight(server_id, lambda: self.fetch(server_id))

    async def refreshed(
        self, server_id: uuid.UUID, rejected: SmtpCredentials
    ) -> SmtpCredentials | None:
        cached = self.cache.get(server_id)
        if (
            cached is not None
            and cached.value is not None
            and cached.value.access_token != rejected.access_token
            and cached.expires > time.monotonic()
        ):
            return cached.value  # another job of this server already got a new token
        pending = self.in_flight.get(server_id)
        if pending is not None:
            # A look-up or a refresh is under way: its answer is newer than the rejected token.
            value = await asyncio.shield(pending)
            if value is None or value.access_token != rejected.access_token:
                return value
        if self.refresh is None or rejected.access_token is None:
            return await self._single_flight(server_id, lambda: self.fetch(server_id))
        digest = token_digest(rejected.access_token)
        refresh = self.refresh
        return await self._single_flight(server_id, lambda: refresh(server_id, digest))

    async def _single_flight(
        self, server_id: uuid.UUID, call: Callable[[], Awaitable[SmtpCredentials | None]]
    ) -> SmtpCredentials | None:
        pending = self.in_flight.get(server_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[SmtpCredentials | None] = asyncio.get_running_loop().create_future()
        self.in_flight[server_id] = future
        try:
            value = await call()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unawaited future logs nothing
            raise
        else:
            future.set_result(value)
            if value is None:
                self.cache.pop(server_id, None)
            else:
                self.cache[server_id] = _Cached(value, self._expiry(value))
            return value
        finally:
            self.in_flight.pop(server_id, None)

    def forget(self, server_id: uuid.UUID) -> None:
        self.cache.pop(server_id, None)

    async def report_auth_failure(self, server_id: uuid.UUID, reply: str) -> None:
        self.forget(server_id)
        await self.report(server_id, reply)


class HttpRegistry:
    """The registry's internal routes."""

    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}

    async def fetch(self, server_id: uuid.UUID) -> SmtpCredentials | None:
        return await get_model(
            self.client,
            f"/internal/v1/servers/{server_id}/credentials",
            SmtpCredentials,
            headers=self.headers,
            unavailable=DependencyUnavailable,
        )

    async def refresh(self, server_id: uuid.UUID, rejected_sha256: str) -> SmtpCredentials | None:
        return await get_model(
            self.client,
            f"/internal/v1/servers/{server_id}/credentials/refresh",
            SmtpCredentials,
            headers=self.headers,
            unavailable=DependencyUnavailable,
            body={"rejected_token_sha256": rejected_sha256},
        )

    async def report(self, server_id: uuid.UUID, reply: str) -> None:
        """Raises `DependencyUnavailable` while the registry cannot take the report (the worker
        waits and tries again); a server deleted meanwhile (404) needs no report."""
        try:
            response = await self.client.post(
                f"/internal/v1/servers/{server_id}/health",
                content=HealthReport(status="auth_failed", reply=reply[:1000]).model_dump_json(),
                headers={**self.headers, "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise DependencyUnavailable(f"registry unreachable: {type(exc).__name__}") from exc
        if response.status_code not in (200, 404):
            raise DependencyUnavailable(f"registry answered {response.status_code}")


class HttpJobStates:
    """The scheduler's internal route, asked for many jobs at once."""

    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}

    async def sendable(self, jobs: Iterable[JobKey]) -> set[uuid.UUID]:
        query = SendableQuery(jobs=[JobRef(email_id=e, job_id=j) for e, j in jobs])
        try:
            response = await self.client.post(
                "/internal/v1/jobs/sendable",
                content=query.model_dump_json(),
                headers={**self.headers, "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise DependencyUnavailable(f"scheduler unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise DependencyUnavailable(f"scheduler answered {response.status_code}")
        return set(SendableAnswer.model_validate_json(response.content).sendable)

    async def report(self, result: SendResult) -> None:
        try:
            response = await self.client.post(
                "/internal/v1/results",
                content=ResultsReport(results=[result]).model_dump_json(),
                headers={**self.headers, "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise DependencyUnavailable(f"scheduler unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise DependencyUnavailable(f"scheduler answered {response.status_code}")


class BatchedJobStates:
    """Collects the questions asked within a few milliseconds into one call: after a broker
    restart every redelivered job asks at once."""

    def __init__(self, source: JobStates, *, max_batch: int = 500, linger: float = 0.005) -> None:
        self.source = source
        self.batches: Batches[JobKey, bool] = Batches(self._ask, max_batch=max_batch, linger=linger)

    async def report(self, result: SendResult) -> None:
        await self.source.report(result)

    async def is_sendable(self, email_id: uuid.UUID, job_id: uuid.UUID) -> bool:
        return await self.batches.submit((email_id, job_id))

    async def _ask(self, jobs: list[JobKey]) -> list[bool]:
        sendable = await self.source.sendable(jobs)
        return [job_id in sendable for _, job_id in jobs]
