"""The scheduler's own copy of the registry's tenants and servers (`scheduler_tenants`,
`scheduler_servers`), and the reads the scheduler makes of it.

Fed by the registry's changes on `<prefix>.registry-changes.scheduler` (applied by version, so a
replay or a reordering changes nothing), rebuilt from the registry's snapshot routes when it is
empty (a new database, a lost copy), healed from them every `ABL_COPY_RESYNC_SECONDS`, and asked
about one tenant when a request needs a record before its change has arrived (a server added a
moment ago, an API key just made). The scheduler reads no table of the registry's.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler.models import SchedulerCopyState, SchedulerServer, SchedulerTenant
from shared.copies import CopyKeeper, apply_newer, resync
from shared.db import table_of
from shared.metrics import COPY_READS
from shared.registry_changes import COPY_PAGE_MAX, CopyUnavailable, RegistryChange, RegistrySource

logger = logging.getLogger("abl.scheduler.copy")

SENDABLE_STATUS = "active"
SERVERS = table_of(SchedulerServer)
TENANTS = table_of(SchedulerTenant)
# A tenant's servers are read from the registry on demand at most this often.
REFRESH_SECONDS = 5.0
REFRESHES_KEPT = 10_000


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
        SERVERS.c.id,
        SERVERS.c.tenant_id,
        SERVERS.c.status,
        SERVERS.c.daily_cap,
        SERVERS.c.label,
        SERVERS.c.host,
        SERVERS.c.username,
        SERVERS.c.provider,
    ).where(SERVERS.c.deleted.is_(False))


async def tenant_servers(session: AsyncSession, tenant_id: uuid.UUID) -> list[ServerView]:
    query = _select_servers().where(SERVERS.c.tenant_id == tenant_id).order_by(SERVERS.c.id)
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
        .where(SERVERS.c.tenant_id.in_(tenant_ids))
        .order_by(SERVERS.c.tenant_id, SERVERS.c.id)
    )
    rows = (await session.exec(query)).all()
    return [ServerView(*row) for row in rows]


async def tenant_server(
    session: AsyncSession, tenant_id: uuid.UUID, server_id: uuid.UUID
) -> ServerView | None:
    query = _select_servers().where(SERVERS.c.tenant_id == tenant_id, SERVERS.c.id == server_id)
    row = (await session.exec(query)).first()
    return ServerView(*row) if row is not None else None


async def server_status_counts(session: AsyncSession) -> dict[str, int]:
    """How many servers are in each status, across tenants (for the metrics)."""
    query = (
        select(SERVERS.c.status, func.count())
        .where(SERVERS.c.deleted.is_(False))
        .group_by(SERVERS.c.status)
    )
    rows: Any = (await session.exec(query)).all()  # type: ignore[call-overload]
    return {str(status): int(count) for status, count in rows}


async def mailbox_servers(session: AsyncSession) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(server id, tenant id) of every server with a mailbox to read, whatever its status: a
    paused server's bounces and replies still come back."""
    query = (
        select(SERVERS.c.id, SERVERS.c.tenant_id)
        .where(SERVERS.c.reads_mailbox.is_(True), SERVERS.c.deleted.is_(False))
        .order_by(SERVERS.c.id)
    )
    rows: Any = (await session.exec(query)).all()  # type: ignore[call-overload]
    return [(server_id, tenant_id) for server_id, tenant_id in rows]


class RegistryCopy(CopyKeeper):
    """The scheduler's copy: the registry's tenants and servers."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        source: RegistrySource,
        *,
        resync_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            sessions,
            source,
            TENANTS,
            table_of(SchedulerCopyState),
            service="scheduler",
            resync_seconds=resync_seconds,
        )
        self.clock = clock
        self._refreshed: OrderedDict[uuid.UUID, float] = OrderedDict()

    @property
    def tables(self) -> tuple[Table, ...]:
        return (TENANTS, SERVERS)

    async def apply(self, session: AsyncSession, change: RegistryChange) -> int:
        changed = await super().apply(session, change)
        if change.server is not None:
            changed += await apply_newer(session, SERVERS, [change.server])
        return changed

    async def read_all(self) -> int:
        changed = await self.tenants.resync()
        changed += await resync(
            self.sessions,
            SERVERS,
            lambda cursor: self.source.servers(cursor=cursor, limit=COPY_PAGE_MAX),
        )
        return changed

    async def ensure_servers(self, tenant_id: uuid.UUID) -> None:
        """A tenant with no sendable server in the copy may have added one a moment ago, its
        change still on the way: its servers are read from the registry now. Uses sessions of
        its own: call it before the request's transaction reads or writes."""
        async with self.sessions() as session:
            if any(s.sendable for s in await tenant_servers(session, tenant_id)):
                return
        await self._refresh(tenant_id)

    async def ensure_server(self, tenant_id: uuid.UUID, server_id: uuid.UUID) -> None:
        """The same for one server a request names."""
        async with self.sessions() as session:
            if await tenant_server(session, tenant_id, server_id) is not None:
                return
        await self._refresh(tenant_id)

    async def refresh_server(self, server_id: uuid.UUID) -> None:
        """Read a server's tenant's servers from the registry now: the scheduler has just had
        the registry change it (the bounce-rate guard's pause), and dispatch must not wait for
        the change to come round by the bus."""
        async with self.sessions() as session:
            query = select(SERVERS.c.tenant_id).where(SERVERS.c.id == server_id)
            row = (await session.exec(query)).first()  # type: ignore[call-overload]
        if row is not None:
            await self._refresh(row[0], asked_by_us=True)

    async def _refresh(self, tenant_id: uuid.UUID, *, asked_by_us: bool = False) -> None:
        # A request's read-through happens at most once every few seconds per tenant, so a
        # tenant asking again and again about a server it does not have costs the registry
        # little; a registry that cannot answer leaves the copy as it is.
        now = self.clock()
        asked = self._refreshed.get(tenant_id)
        if not asked_by_us and asked is not None and now - asked < REFRESH_SECONDS:
            return
        self._refreshed[tenant_id] = now
        self._refreshed.move_to_end(tenant_id)
        while len(self._refreshed) > REFRESHES_KEPT:
            self._refreshed.popitem(last=False)
        try:
            await resync(
                self.sessions,
                SERVERS,
                lambda cursor: self.source.servers(
                    cursor=cursor, limit=COPY_PAGE_MAX, tenant_id=tenant_id
                ),
                scope=SERVERS.c.tenant_id == tenant_id,
            )
        except Exception as exc:  # best effort: the change still arrives by the bus
            COPY_READS.labels(self.service, "servers", "failed").inc()
            why = str(exc) if isinstance(exc, CopyUnavailable) else type(exc).__name__
            logger.warning("servers of a tenant not read from the registry: %s", why)
        else:
            COPY_READS.labels(self.service, "servers", "ok").inc()
