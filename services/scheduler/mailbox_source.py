"""Where the mailbox reader gets a mailbox's access and tells what it saw, in the stack: the
registry's internal routes (`ABL_REGISTRY_URL`, authenticated by `ABL_INTERNAL_TOKEN`).

The IMAP password (or an OAuth server's short-lived access token) travels only in the answer of
`GET /internal/v1/servers/{id}/imap-credentials` (HTTP, `Cache-Control: no-store`), is held for
the one read it serves, and is never logged or put on the broker. Which servers have a mailbox is
read from the registry's table like the servers' caps (`shared/registry_read.py`), without any
secret.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

import httpx
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler.inbox import AccessUnavailable, MailboxRef
from shared import registry_read
from shared.imap import ImapAuth, ImapEndpoint, ImapSecurity
from shared.messages import BouncePause, ImapCredentials, MailboxPoll

logger = logging.getLogger("abl.scheduler.inbox")


async def listed_mailboxes(sessions: async_sessionmaker[AsyncSession]) -> list[MailboxRef]:
    async with sessions() as session:
        rows = await registry_read.mailbox_servers(session)
    return [MailboxRef(server_id, tenant_id) for server_id, tenant_id in rows]


def endpoint_of(credentials: ImapCredentials) -> ImapEndpoint:
    return ImapEndpoint(
        credentials.host,
        credentials.port,
        ImapSecurity(credentials.security),
        credentials.username,
        (credentials.access_token or "") if credentials.auth == "xoauth2" else credentials.password,
        ImapAuth(credentials.auth),
    )


class HttpMailboxSource:
    """A `MailboxSource` over the registry's internal routes."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        token: str,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}
        self.sessions = sessions

    async def mailboxes(self) -> list[MailboxRef]:
        return await listed_mailboxes(self.sessions)

    async def endpoint(
        self, server_id: uuid.UUID, rejected: str | None = None
    ) -> ImapEndpoint | None:
        path = f"/internal/v1/servers/{server_id}/imap-credentials"
        try:
            if rejected is None:
                response = await self.client.get(path, headers=self.headers)
            else:
                response = await self.client.post(
                    f"{path}/refresh",
                    json={"rejected_token_sha256": rejected},
                    headers=self.headers,
                )
        except httpx.HTTPError as exc:
            raise AccessUnavailable(f"registry unreachable: {type(exc).__name__}") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise AccessUnavailable(f"registry answered {response.status_code}")
        return endpoint_of(ImapCredentials.model_validate_json(response.content))

    async def report(self, server_id: uuid.UUID, at: datetime, error: str | None) -> None:
        body = MailboxPoll(polled_at=at, error=error[:512] if error else None)
        response = await self.client.post(
            f"/internal/v1/servers/{server_id}/mailbox-poll",
            content=body.model_dump_json(),
            headers={**self.headers, "Content-Type": "application/json"},
        )
        if response.status_code not in (204, 404):  # 404: the server was deleted meanwhile
            response.raise_for_status()

    async def pause(self, server_id: uuid.UUID, reason: str) -> None:
        body = BouncePause(reason=reason[:512])
        response = await self.client.post(
            f"/internal/v1/servers/{server_id}/bounce-pause",
            content=body.model_dump_json(),
            headers={**self.headers, "Content-Type": "application/json"},
        )
        if response.status_code != 404:
            response.raise_for_status()
