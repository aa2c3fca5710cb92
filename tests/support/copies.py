"""Whether the services' copies of the registry hold every change it made (for tests that drive
the scheduler themselves right after changing tenants or servers through the registry)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import changes
from services.scheduler.registry_copy import SERVERS
from shared.copies import CopyKeeper


async def _copied(session: AsyncSession, table: Table) -> dict[uuid.UUID, int]:
    query = select(table.c.id, table.c.version).where(table.c.deleted.is_(False))
    rows = (await session.exec(query)).all()  # type: ignore[call-overload]
    return {row_id: version for row_id, version in rows}


async def copies_match(
    sessions: async_sessionmaker[AsyncSession], copies: Mapping[str, CopyKeeper]
) -> bool:
    async with sessions() as session:
        tenants = await changes.tenant_copies(session, after=None, limit=1000)
        servers = await changes.server_copies(session, after=None, limit=1000)
        live_tenants = {t.id: t.version for t in tenants.items}
        live_servers = {s.id: s.version for s in servers.items}
        for keeper in copies.values():
            for table in keeper.tables:
                expected = live_servers if table is SERVERS else live_tenants
                if await _copied(session, table) != expected:
                    return False
    return True
