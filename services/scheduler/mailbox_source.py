"""Where the mailbox reader gets a mailbox's access and tells what it saw, in the stack: the
registry's internal routes (`ABL_REGISTRY_URL`, authenticated by `ABL_INTERNAL_TOKEN`).

The IMAP password (or an OAuth server's short-lived access token) travels only in the answer of
`GET /internal/v1/servers/{id}/imap-credentials` (HTTP, `Cache-Control: no-store`), is held for
the one read it serves, and is never logged or put on the broker. Which servers have a mailbox is
read from the scheduler's copy of the registry's servers (`services.scheduler.registry_copy`),
which holds no secret.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

import httpx
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import registry_copy
from services.scheduler.inbox import AccessUnavailable, MailboxRef
from shared.imap import ImapAuth, ImapEndpoint, ImapSecurity
from shared.internal_client import get_model
from shared.messages import BouncePause, ImapCredentials, MailboxPoll, PollReputation

logger = logging.getLogger("abl.scheduler.inbox")


async def listed_mailboxes(sessions: async_sessionmaker[AsyncSession]) -> list[MailboxRef]:
    async with sessions() as session:
        rows = await registry_copy.mailbox_servers(session)
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
        credentials = await get_model(
            self.client,
            path if rejected is None else f"{path}/refresh",
            ImapCredentials,
            headers=self.headers,
            unavailable=AccessUnavailable,
            body=None if rejected is None else {"rejected_token_sha256": rejected},
        )
        return None if credentials is None else endpoint_of(credentials)

    async def report(
        self,
        server_id: uuid.UUID,
        at: datetime,
        error: str | None,
        reputation: PollReputation | None = None,
    ) -> None:
        body = MailboxPoll(
            polled_at=at, error=error[:512] if error else None, reputation=reputation
        )
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
