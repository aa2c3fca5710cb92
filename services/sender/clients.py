"""HTTP clients of the other services: credentials from the registry, job state from the
scheduler. Credentials live in memory only, for a short time."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

import httpx

from shared.errors import TransientMessageError
from shared.messages import SmtpCredentials


@dataclass
class _Cached:
    value: SmtpCredentials
    expires: float


class RegistryClient:
    def __init__(self, client: httpx.AsyncClient, token: str, ttl_seconds: float) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}
        self.ttl = ttl_seconds
        self.cache: dict[uuid.UUID, _Cached] = {}

    async def credentials(self, server_id: uuid.UUID) -> SmtpCredentials | None:
        """The server's credentials, or None when it no longer exists."""
        cached = self.cache.get(server_id)
        if cached is not None and cached.expires > time.monotonic():
            return cached.value
        try:
            response = await self.client.get(
                f"/internal/v1/servers/{server_id}/credentials", headers=self.headers
            )
        except httpx.HTTPError as exc:
            raise TransientMessageError(f"registry unreachable: {type(exc).__name__}") from exc
        if response.status_code == 404:
            self.cache.pop(server_id, None)
            return None
        if response.status_code != 200:
            raise TransientMessageError(f"registry answered {response.status_code}")
        value = SmtpCredentials.model_validate_json(response.content)
        self.cache[server_id] = _Cached(value, time.monotonic() + self.ttl)
        return value

    def forget(self, server_id: uuid.UUID) -> None:
        self.cache.pop(server_id, None)

    async def report_auth_failure(self, server_id: uuid.UUID, reply: str) -> None:
        self.forget(server_id)
        # If the registry cannot be told, the scheduler still parks the server from the result.
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(
                f"/internal/v1/servers/{server_id}/health",
                json={"status": "auth_failed", "reply": reply[:1000]},
                headers=self.headers,
            )


class SchedulerClient:
    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}

    async def sendable(self, email_id: uuid.UUID, job_id: uuid.UUID) -> bool:
        """False once the email is sent, unknown, canceled, or has moved to another attempt."""
        try:
            response = await self.client.get(
                f"/internal/v1/emails/{email_id}/jobs/{job_id}", headers=self.headers
            )
        except httpx.HTTPError as exc:
            raise TransientMessageError(f"scheduler unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise TransientMessageError(f"scheduler answered {response.status_code}")
        return bool(response.json()["sendable"])
