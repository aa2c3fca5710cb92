"""The registry's servers as other services may see them: read-only, through this module.

The registry owns `smtp_servers`; the scheduler needs to know which of a tenant's servers may
send and their caps. These queries name only the columns they need and never the password.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, String, Uuid, column, func, select, table
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.errors import NotFound

SENDABLE_STATUS = "active"

_servers = table(
    "smtp_servers",
    column("id", Uuid),
    column("tenant_id", Uuid),
    column("status", String),
    column("daily_cap", Integer),
    column("label", String),
    column("host", String),
    column("username", String),
    column("imap_host", String),
    column("provider", String),
)


class ServerNotFound(NotFound):
    """No server with this id for this tenant."""

    code = "server_not_found"
    default_detail = "No server 01900000-0000-7000-8000-000000000000 for this tenant."
    hint = "List your servers with GET /v1/servers."


def server_not_found(server_id: uuid.UUID) -> NotFound:
    return ServerNotFound(f"No server {server_id} for this tenant.")


@dataclass(frozen=True)
class ServerView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    status: str
    daily_cap: int
    label: str
    # Where it submits, and the provider the registry stored at its check (null for a row
    # stored before it did: the host then tells), so that the scheduler keeps its limits.
    host: str = ""
    username: str = ""
    provider: str | None = None

    @property
    def sendable(self) -> bool:
        return self.status == SENDABLE_STATUS


def _select_servers() -> Any:  # Any: sqlmodel's exec() is typed for its own select only
    return select(
        _servers.c.id,
        _servers.c.tenant_id,
        _servers.c.status,
        _servers.c.daily_cap,
        _servers.c.label,
        _servers.c.host,
        _servers.c.username,
        _servers.c.provider,
    )


async def tenant_servers(session: AsyncSession, tenant_id: uuid.UUID) -> list[ServerView]:
    query = _select_servers().where(_servers.c.tenant_id == tenant_id).order_by(_servers.c.id)
    rows = (await session.exec(query)).all()
    return [ServerView(*row) for row in rows]


async def servers_of_tenants(
    session: AsyncSession, tenant_ids: list[uuid.UUID]
) -> list[ServerView]:
    """The servers of many tenants in one query (the dispatcher's per-transaction read)."""
    if not tenant_ids:
        return []
    query = (
        _select_servers()
        .where(_servers.c.tenant_id.in_(tenant_ids))
        .order_by(_servers.c.tenant_id, _servers.c.id)
    )
    rows = (await session.exec(query)).all()
    return [ServerView(*row) for row in rows]


async def tenant_server(
    session: AsyncSession, tenant_id: uuid.UUID, server_id: uuid.UUID
) -> ServerView | None:
    query = _select_servers().where(_servers.c.tenant_id == tenant_id, _servers.c.id == server_id)
    row = (await session.exec(query)).first()
    return ServerView(*row) if row is not None else None


async def server_status_counts(session: AsyncSession) -> dict[str, int]:
    """How many servers are in each status, across tenants (for the metrics)."""
    query = select(_servers.c.status, func.count()).group_by(_servers.c.status)
    rows: Any = (await session.exec(query)).all()  # type: ignore[call-overload]
    return {str(status): int(count) for status, count in rows}


async def mailbox_servers(session: AsyncSession) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(server id, tenant id) of every server with a mailbox to read, whatever its status: a
    paused server's bounces and replies still come back."""
    query = (
        select(_servers.c.id, _servers.c.tenant_id)
        .where(_servers.c.imap_host.is_not(None))
        .order_by(_servers.c.id)
    )
    rows: Any = (await session.exec(query)).all()  # type: ignore[call-overload]
    return [(server_id, tenant_id) for server_id, tenant_id in rows]
