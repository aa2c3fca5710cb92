"""The senders' use cases of the registry: a server's credentials, and a report that they were
refused. Served over HTTP on the internal routes, called directly in the one-process shape.

A password server's credentials hold its password; an OAuth server's hold a short-lived access
token only (refreshed here when needed): its refresh token never leaves the registry."""

from __future__ import annotations

import uuid

from sqlalchemy import update
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import events, repository
from services.registry.domain import AuthMethod, Security, ServerStatus, unchanged_by
from services.registry.models import SmtpServer
from services.registry.oauth.tokens import TokenKeeper
from shared.crypto import Keyring
from shared.db import table_of
from shared.messages import SmtpCredentials
from shared.providers import provider_of
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
        # The read is over: end its transaction before waiting, so that callers waiting for
        # one refresh (however many) hold no pooled connection the refresh itself needs.
        await session.commit()
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
        per_minute=provider.per_minute
        if (provider := provider_of(server.provider, server.host, server.username))
        else None,
    )


async def record_health(
    session: AsyncSession, server_id: uuid.UUID, status: ServerStatus, reply: str
) -> SmtpServer:
    """A sender saw the server refuse its credentials; a paused server stays paused.

    The status changes in one conditional UPDATE: of several senders reporting the same server
    at once, one changes it (and writes the one `server.status_changed` event), the others only
    refresh the last check."""
    server = await repository.get_server_any_tenant(session, server_id)
    previous = str(server.status)
    now = utcnow()
    table = table_of(SmtpServer)
    check = {"last_check_code": status.value, "last_check_reply": reply[:512]}
    changed = await session.exec(
        update(table)
        .where(table.c.id == server_id, table.c.status.not_in(unchanged_by(status)))
        .values(status=status.value, last_checked_at=now, updated_at=now, **check)
    )
    if changed.rowcount:
        await events.record_change(session, server, previous, status.value, status.value)
    else:
        await session.exec(
            update(table)
            .where(table.c.id == server_id)
            .values(last_checked_at=now, updated_at=now, **check)
        )
    await session.refresh(server)
    return server


async def pause_for_bounces(
    session: AsyncSession, server_id: uuid.UUID, reason: str
) -> SmtpServer | None:
    """The scheduler's bounce-rate guard pauses a server; one paused by hand stays so. The
    server as it now is; None when it does not exist. One conditional UPDATE, so that of two
    replicas pausing it at once one writes the `server.status_changed` event."""
    server = await session.get(SmtpServer, server_id)
    if server is None:
        return None
    previous = str(server.status)
    table = table_of(SmtpServer)
    changed = await session.exec(
        update(table)
        .where(
            table.c.id == server_id,
            table.c.status.not_in(unchanged_by(ServerStatus.paused_bounces)),
        )
        .values(
            status=ServerStatus.paused_bounces.value,
            status_reason=reason[:512],
            updated_at=utcnow(),
        )
    )
    if changed.rowcount:
        await events.record_change(
            session, server, previous, ServerStatus.paused_bounces.value, reason[:512]
        )
    await session.refresh(server)
    return server
