"""The senders' use cases of the registry: a server's credentials, and a report that they were
refused. Served over HTTP on the internal routes, called directly in the one-process shape."""

from __future__ import annotations

import uuid

from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import repository
from services.registry.domain import Security, ServerStatus
from services.registry.models import SmtpServer
from shared.crypto import Keyring
from shared.messages import SmtpCredentials
from shared.timeutil import utcnow


async def server_credentials(
    session: AsyncSession, keyring: Keyring, server_id: uuid.UUID
) -> SmtpCredentials | None:
    """The server's decrypted credentials; None when it does not exist (any tenant)."""
    server = await session.get(SmtpServer, server_id)
    if server is None:
        return None
    return SmtpCredentials(
        id=server.id,
        tenant_id=server.tenant_id,
        host=server.host,
        port=server.port,
        security=Security(server.security).value,
        username=server.username,
        password=repository.open_password(keyring, server),
        from_email=server.from_email,
        from_name=server.from_name,
        status=ServerStatus(server.status).value,
        daily_cap=server.daily_cap,
    )


async def record_health(
    session: AsyncSession, server_id: uuid.UUID, status: ServerStatus, reply: str
) -> SmtpServer:
    """A sender saw the server refuse its credentials; a paused server stays paused."""
    server = await repository.get_server_any_tenant(session, server_id)
    server.last_check_code = status.value
    server.last_check_reply = reply[:512]
    server.last_checked_at = utcnow()
    if server.status != ServerStatus.paused:
        server.status = status
    server.updated_at = utcnow()
    session.add(server)
    return server
