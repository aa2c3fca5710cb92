"""Data access for tenants and SMTP servers. Every query is scoped to one tenant."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry.models import SmtpServer, Tenant
from shared.crypto import Keyring, associated_data
from shared.errors import Conflict, server_not_found
from shared.tenancy import AuthenticatedTenant


class ServerExists(Conflict):
    """The tenant already has a server with this host and username."""

    code = "server_exists"
    default_detail = "This tenant already has a server with this host and username."
    hint = "Update the existing server with PATCH /v1/servers/{id} instead."


def duplicate_login() -> Conflict:
    return ServerExists()


async def get_server(
    session: AsyncSession, tenant_id: uuid.UUID, server_id: uuid.UUID
) -> SmtpServer:
    query = select(SmtpServer).where(SmtpServer.id == server_id, SmtpServer.tenant_id == tenant_id)
    server = (await session.exec(query)).first()
    if server is None:
        raise server_not_found(server_id)
    return server


async def get_server_any_tenant(session: AsyncSession, server_id: uuid.UUID) -> SmtpServer:
    server = await session.get(SmtpServer, server_id)
    if server is None:
        raise server_not_found(server_id)
    return server


async def list_servers(
    session: AsyncSession, tenant_id: uuid.UUID, *, after: uuid.UUID | None, limit: int
) -> tuple[Sequence[SmtpServer], uuid.UUID | None]:
    query = select(SmtpServer).where(SmtpServer.tenant_id == tenant_id)
    if after is not None:
        query = query.where(col(SmtpServer.id) > after)
    rows = (await session.exec(query.order_by(col(SmtpServer.id)).limit(limit + 1))).all()
    next_after = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_after


async def login_taken(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    host: str,
    username: str,
    exclude: uuid.UUID | None = None,
) -> bool:
    query = select(SmtpServer.id).where(
        SmtpServer.tenant_id == tenant_id,
        SmtpServer.host == host,
        SmtpServer.username == username,
    )
    if exclude is not None:
        query = query.where(SmtpServer.id != exclude)
    return (await session.exec(query)).first() is not None


async def flush_unique(session: AsyncSession) -> None:
    """Flush, turning a lost race on (tenant, host, username) into a 409."""
    try:
        await session.flush()
    except IntegrityError as exc:
        raise duplicate_login() from exc


def seal_password(keyring: Keyring, server: SmtpServer, password: str) -> None:
    server.password_ciphertext = keyring.encrypt(
        password, associated_data(server.tenant_id, server.id)
    )


def open_password(keyring: Keyring, server: SmtpServer) -> str:
    return keyring.decrypt(server.password_ciphertext, associated_data(server.tenant_id, server.id))


# What a ciphertext holds, named in its associated data (not secrets).
REFRESH_TOKEN = "oauth-refresh-token"  # noqa: S105
ACCESS_TOKEN = "oauth-access-token"  # noqa: S105


def seal_token(keyring: Keyring, server: SmtpServer, purpose: str, token: str) -> str:
    return keyring.encrypt(token, associated_data(server.tenant_id, server.id, purpose))


def open_token(keyring: Keyring, server: SmtpServer, purpose: str, sealed: str) -> str:
    return keyring.decrypt(sealed, associated_data(server.tenant_id, server.id, purpose))


async def add_tenant(session: AsyncSession, tenant: Tenant) -> Tenant:
    session.add(tenant)
    await session.flush()
    return tenant


async def iter_all_servers(session: AsyncSession, batch: int = 500) -> AsyncIterator[SmtpServer]:
    after: uuid.UUID | None = None
    while True:
        query = select(SmtpServer).order_by(col(SmtpServer.id)).limit(batch)
        if after is not None:
            query = query.where(col(SmtpServer.id) > after)
        rows = (await session.exec(query)).all()
        if not rows:
            return
        for row in rows:
            yield row
        after = rows[-1].id


class RegistryTenants:
    """The registry's own `tenants`, as the `TenantLookup` of its routes."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def authenticate(self, digest: str) -> AuthenticatedTenant | None:
        # A session of its own, closed at once: the request's session must not hold a pooled
        # connection while the handler waits on a slow SMTP server.
        async with self.sessions() as session:
            query = select(Tenant).where(Tenant.api_key_hash == digest)
            tenant = (await session.exec(query)).first()
        return None if tenant is None else AuthenticatedTenant(id=tenant.id, name=tenant.name)
