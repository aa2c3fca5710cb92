"""The senders' use cases of the registry: a server's credentials, and a report that they were
refused. Served over HTTP on the internal routes, called directly in the one-process shape.

A password server's credentials hold its password; an OAuth server's hold a short-lived access
token only (refreshed here when needed): its refresh token never leaves the registry."""

from __future__ import annotations

import uuid

from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import repository
from services.registry.domain import AuthMethod, Security, ServerStatus
from services.registry.models import SmtpServer
from services.registry.oauth.tokens import TokenKeeper
from shared.crypto import Keyring
from shared.messages import SmtpCredentials
from shared.timeutil import utcnow


async def server_credentials(
    session: AsyncSession,
    keyring: Keyring,
    tokens: TokenKeeper,
    server_id: uuid.UUID,
    *,
    rejected_token: str | None = None,
) -> SmtpCredentials | None:
    """The server's decrypted credentials; None when it does not exist (any tenant).

    For an OAuth server, `rejected_token` (a digest, see `token_digest`) names the access token
    a sender saw refused: a new one is fetched unless another caller already did. Raises
    `TokenUnavailable` when the provider cannot answer now.
    """
    server = await session.get(SmtpServer, server_id)
    if server is None:
        return None
    password = ""
    access_token = None
    expires_at = None
    status = ServerStatus(server.status)
    if AuthMethod(server.auth) is AuthMethod.password:
        password = repository.open_password(keyring, server)
    elif status is ServerStatus.active:
        token = await tokens.token(server, rejected_token)
        if token is None:
            status = ServerStatus.auth_failed  # the grant is gone; the row says so now
        else:
            access_token, expires_at = token.value, token.expires_at
    return SmtpCredentials(
        id=server.id,
        tenant_id=server.tenant_id,
        host=server.host,
        port=server.port,
        security=Security(server.security).value,
        username=server.username,
        auth=AuthMethod(server.auth).value,
        password=password,
        access_token=access_token,
        access_token_expires_at=expires_at,
        from_email=server.from_email,
        from_name=server.from_name,
        status=status.value,
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
