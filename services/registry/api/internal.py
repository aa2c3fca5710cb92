"""Endpoints for the other services, authenticated by `ABL_INTERNAL_TOKEN`. Never public."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from services.registry import changes, mailbox
from services.registry import credentials as use_cases
from services.registry.deps import KeyringDep, TokenKeeperDep
from services.registry.domain import ServerStatus
from services.registry.models import HealthAck
from services.registry.oauth.tokens import TokenUnavailable
from shared.db import SessionDep
from shared.errors import (
    AppError,
    NotFound,
    ServerNotFound,
    ServiceUnavailable,
    raises,
    server_not_found,
)
from shared.messages import (
    BouncePause,
    HealthReport,
    ImapCredentials,
    MailboxPoll,
    SmtpCredentials,
)
from shared.pagination import LIMIT_DESCRIPTION, CursorQuery, InvalidCursor, decode_cursor
from shared.registry_changes import COPY_PAGE_MAX, ServerCopyPage, TenantCopyPage
from shared.tenancy import InternalDep

T = TypeVar("T")

router = APIRouter(prefix="/internal/v1", dependencies=[InternalDep])
CopyLimitQuery = Annotated[int, Query(ge=1, le=COPY_PAGE_MAX, description=LIMIT_DESCRIPTION)]


class OAuthProviderUnavailable(ServiceUnavailable):
    """The OAuth provider could not refresh this server's access token now."""

    code = "oauth_provider_unavailable"
    default_detail = "The OAuth provider could not refresh this server's access token now."
    hint = "Try again shortly."


class MailboxNotFound(NotFound):
    """The server does not exist or reads no mailbox."""

    code = "mailbox_not_found"
    default_detail = "Server 01900000-0000-7000-8000-000000000000 reads no mailbox."
    hint = "Only servers with an `imap` object have a mailbox to read."


def _mailbox_not_found(server_id: uuid.UUID) -> MailboxNotFound:
    return MailboxNotFound(f"Server {server_id} does not exist or reads no mailbox.")


class TokenRejected(BaseModel):
    rejected_token_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (hex) of the access token the SMTP (or IMAP) server refused.",
    )


async def _no_store(
    response: Response, lookup: Awaitable[T | None], missing: Callable[[], AppError]
) -> T:
    """Secrets for one use: never cached; a provider that cannot refresh now is a 503."""
    response.headers["Cache-Control"] = "no-store"
    try:
        found = await lookup
    except TokenUnavailable:
        # The caller waits with backoff and asks again; the server is not at fault.
        raise OAuthProviderUnavailable() from None
    if found is None:
        raise missing()
    return found


@router.get(
    "/servers/{server_id}/credentials",
    tags=["credentials"],
    summary="One server's credentials for the senders: its password, or a fresh access token",
)
@raises(ServerNotFound, OAuthProviderUnavailable)
async def get_server_credentials(
    server_id: uuid.UUID,
    session: SessionDep,
    keyring: KeyringDep,
    tokens: TokenKeeperDep,
    response: Response,
) -> SmtpCredentials:
    """`Cache-Control: no-store`; a sender keeps them briefly in memory only."""
    return await _no_store(
        response,
        use_cases.server_credentials(session, keyring, tokens, server_id),
        lambda: server_not_found(server_id),
    )


@router.post(
    "/servers/{server_id}/credentials/refresh",
    tags=["credentials"],
    summary="An OAuth server refused this access token: a new one (refreshed once for all)",
)
@raises(ServerNotFound, OAuthProviderUnavailable)
async def refresh_server_credentials(
    server_id: uuid.UUID,
    body: TokenRejected,
    session: SessionDep,
    keyring: KeyringDep,
    tokens: TokenKeeperDep,
    response: Response,
) -> SmtpCredentials:
    """Senders that saw the same token refused get the same new one: the provider is asked
    once."""
    return await _no_store(
        response,
        use_cases.server_credentials(
            session, keyring, tokens, server_id, rejected_token=body.rejected_token_sha256
        ),
        lambda: server_not_found(server_id),
    )


@router.post(
    "/servers/{server_id}/health",
    tags=["server-health"],
    summary="A sender reports that a server refused its credentials",
)
@raises(ServerNotFound)
async def report_server_health(
    server_id: uuid.UUID, body: HealthReport, session: SessionDep
) -> HealthAck:
    """The server's status becomes the reported one (a paused server stays paused), and one
    `server.status_changed` event is written when it changed."""
    server = await use_cases.record_health(
        session, server_id, ServerStatus(body.status), body.reply
    )
    return HealthAck(id=server.id, status=ServerStatus(server.status))


@router.get(
    "/servers/{server_id}/imap-credentials",
    tags=["mailbox"],
    summary="One server's mailbox access, for the scheduler's mailbox reader",
)
@raises(MailboxNotFound, OAuthProviderUnavailable)
async def get_imap_credentials(
    server_id: uuid.UUID,
    session: SessionDep,
    keyring: KeyringDep,
    tokens: TokenKeeperDep,
    response: Response,
) -> ImapCredentials:
    """`Cache-Control: no-store`; the reader keeps them in memory for one read only. An OAuth
    server's own mailbox (`auth: xoauth2`) comes with a short-lived access token only."""
    return await _no_store(
        response,
        mailbox.imap_credentials(session, keyring, tokens, server_id),
        lambda: _mailbox_not_found(server_id),
    )


@router.post(
    "/servers/{server_id}/imap-credentials/refresh",
    tags=["mailbox"],
    summary="The IMAP server refused this access token: a new one (refreshed once for all)",
)
@raises(MailboxNotFound, OAuthProviderUnavailable)
async def refresh_imap_credentials(
    server_id: uuid.UUID,
    body: TokenRejected,
    session: SessionDep,
    keyring: KeyringDep,
    tokens: TokenKeeperDep,
    response: Response,
) -> ImapCredentials:
    """The same single-flight refresh as the senders': the provider is asked once."""
    return await _no_store(
        response,
        mailbox.imap_credentials(
            session, keyring, tokens, server_id, rejected_token=body.rejected_token_sha256
        ),
        lambda: _mailbox_not_found(server_id),
    )


@router.post(
    "/servers/{server_id}/mailbox-poll",
    tags=["mailbox"],
    status_code=204,
    summary="The mailbox reader reports one read of a server's INBOX (time, error, rates)",
)
@raises(ServerNotFound)
async def report_mailbox_poll(server_id: uuid.UUID, body: MailboxPoll, session: SessionDep) -> None:
    """Shown as `imap.last_poll_at` and `imap.last_poll_error` on the server's view, and the
    bounce and complaint rates sent with it as `reputation` (optional: a report without them
    keeps the stored ones)."""
    if not await mailbox.record_poll(
        session, server_id, body.polled_at, body.error, body.reputation
    ):
        raise server_not_found(server_id)


@router.post(
    "/servers/{server_id}/bounce-pause",
    tags=["mailbox"],
    summary="The bounce-rate guard pauses a server (`paused_bounces`, with the reason)",
)
@raises(ServerNotFound)
async def pause_for_bounces(
    server_id: uuid.UUID, body: BouncePause, session: SessionDep
) -> HealthAck:
    """One conditional update: two replicas pausing at once write one status event."""
    server = await use_cases.pause_for_bounces(session, server_id, body.reason)
    if server is None:
        raise server_not_found(server_id)
    return HealthAck(id=server.id, status=ServerStatus(server.status))


@router.get(
    "/copies/tenants",
    tags=["copies"],
    summary="A page of tenants as the other services' copies hold them (no secret)",
)
@raises(InvalidCursor)
async def list_tenant_copies(
    session: SessionDep,
    cursor: CursorQuery = None,
    limit: CopyLimitQuery = COPY_PAGE_MAX,
    key_digest: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9a-f]{64}$",
            description="The SHA-256 (hex) of an API key: only the tenant it belongs to.",
        ),
    ] = None,
) -> TenantCopyPage:
    """Paginated in id order: pass `next_cursor` as `cursor` for the next page. `key_digest`
    finds the one tenant of an API key, for a copy asked about a key it has not heard of."""
    after = decode_cursor(cursor) if cursor else None
    return await changes.tenant_copies(session, after=after, limit=limit, key_digest=key_digest)


@router.get(
    "/copies/servers",
    tags=["copies"],
    summary="A page of servers as the other services' copies hold them (no credential)",
)
@raises(InvalidCursor)
async def list_server_copies(
    session: SessionDep,
    cursor: CursorQuery = None,
    limit: CopyLimitQuery = COPY_PAGE_MAX,
    tenant_id: Annotated[uuid.UUID | None, Query(description="Only this tenant's servers.")] = None,
) -> ServerCopyPage:
    """Paginated in id order: pass `next_cursor` as `cursor` for the next page."""
    after = decode_cursor(cursor) if cursor else None
    return await changes.server_copies(session, after=after, limit=limit, tenant_id=tenant_id)
