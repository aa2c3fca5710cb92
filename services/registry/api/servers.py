"""A tenant's SMTP servers. Only a server that passes the connection check is stored."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Response, status
from fastapi.openapi.models import Example

from services.registry import mailbox, repository, service
from services.registry.deps import CheckerDep, KeyringDep, TenantDep, TokenKeeperDep
from services.registry.models import (
    SmtpServerCreate,
    SmtpServerPage,
    SmtpServerPublic,
    SmtpServerUpdate,
)
from services.registry.service import CheckFailed, OAuthServer, PasswordRequired
from shared.db import SessionDep
from shared.errors import ServerNotFound, raises
from shared.pagination import (
    CursorQuery,
    InvalidCursor,
    Limit200Query,
    decode_cursor,
    encode_cursor,
)
from shared.spec import example_response

router = APIRouter(prefix="/v1/servers", tags=["servers"])

GMAIL_SERVER = {
    "preset": "gmail",
    "username": "sales@acme.com",
    "password": "abcd efgh ijkl mnop",
    "from_email": "sales@acme.com",
    "from_name": "Acme Sales",
    "label": "Sales 1",
}
ADD_EXAMPLES = {
    "gmail": Example(
        summary="A Gmail account with an app password (2-Step Verification on)",
        value=GMAIL_SERVER,
    ),
    "own_server": Example(
        summary="Any SMTP server: host, port and security",
        value={
            "host": "smtp.acme.com",
            "port": 587,
            "security": "starttls",
            "username": "sales@acme.com",
            "password": "a long password",
            "from_email": "sales@acme.com",
            "daily_cap": 300,
        },
    ),
}
SERVER_ID = "0193a5d2-7c4e-7b1a-9f3e-2d6c8b1a4e77"
ADDED_GMAIL_SERVER = {
    "id": SERVER_ID,
    "label": "Sales 1",
    "host": "smtp.gmail.com",
    "port": 587,
    "security": "starttls",
    "username": "sales@acme.com",
    "from_email": "sales@acme.com",
    "from_name": "Acme Sales",
    "daily_cap": 500,
    "auth": "password",
    "oauth_provider": None,
    "has_password": True,
    "status": "active",
    "status_reason": None,
    "last_check": {
        "ok": True,
        "code": None,
        "reply": "Connected, TLS verified and authenticated.",
        "at": "2026-11-27T09:30:00Z",
        "hint": None,
    },
    "imap": None,
    "created_at": "2026-11-27T09:30:00Z",
    "updated_at": "2026-11-27T09:30:00Z",
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Add a server: connect, TLS, authenticate; store it only if that passes",
)
@example_response(status.HTTP_201_CREATED, ADDED_GMAIL_SERVER)
@raises(CheckFailed, mailbox.ImapCheckFailed, mailbox.ImapIncomplete, repository.ServerExists)
async def add_server(
    body: Annotated[SmtpServerCreate, Body(openapi_examples=ADD_EXAMPLES)],
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    checker: CheckerDep,
) -> SmtpServerPublic:
    """The registry connects to the server, says EHLO, sets up TLS (the certificate verified),
    authenticates and quits: no email is sent. Only a server that passes is stored (201, status
    `active`); a failure answers 422 with the check's code and the server's reply, and nothing
    is stored. A `preset` (e.g. `gmail`) gives host, port and security; an optional `imap`
    object is checked the same way. Each check takes one of the tenant's connection checks
    (429 `rate_limited` past the budget)."""
    server = await service.add_server(session, keyring, checker, tenant.id, body)
    return server.to_public()


@router.get("", summary="List the tenant's servers, oldest first")
@raises(InvalidCursor)
async def list_servers(
    tenant: TenantDep,
    session: SessionDep,
    limit: Limit200Query = 50,
    cursor: CursorQuery = None,
) -> SmtpServerPage:
    """Paginated: up to `limit` servers per page; pass `next_cursor` as `cursor` for the next
    page (null on the last)."""
    rows, next_after = await service.list_servers(
        session, tenant.id, after=decode_cursor(cursor) if cursor else None, limit=limit
    )
    return SmtpServerPage(
        items=[row.to_public() for row in rows],
        next_cursor=encode_cursor(next_after) if next_after else None,
    )


@router.get("/{server_id}", summary="One server")
@raises(ServerNotFound)
async def get_server(
    server_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SmtpServerPublic:
    """Its status, the last check (`code`, `reply`, `at`, `hint`), warmup-relevant limits and
    its mailbox access; never the password (`has_password` says one is stored). Another
    tenant's id answers 404 like an id that does not exist."""
    return (await service.get_server(session, tenant.id, server_id)).to_public()


@router.patch(
    "/{server_id}",
    summary=(
        "Change a server; a changed host, port, security or credential is checked first, "
        "and a changed host, port, security or username needs the password again"
    ),
)
@raises(
    ServerNotFound,
    OAuthServer,
    PasswordRequired,
    repository.ServerExists,
    CheckFailed,
    mailbox.ImapCheckFailed,
    mailbox.ImapIncomplete,
)
async def update_server(
    server_id: uuid.UUID,
    body: Annotated[
        SmtpServerUpdate,
        Body(
            openapi_examples={
                "rename": Example(summary="Change the label", value={"label": "Sales EU"}),
                "new_password": Example(
                    summary="A new app password (checked before it is saved)",
                    value={"password": "qrst uvwx yzab cdef"},
                ),
            }
        ),
    ],
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    checker: CheckerDep,
) -> SmtpServerPublic:
    """Only the fields sent change. A changed host, port, security, username or password is
    checked before anything is saved (422 with the check's code otherwise, nothing changed). A
    request naming host, port, security or username needs `password` in the same request (422
    `password_required`): the stored password is only ever sent to the server it was verified
    against. An OAuth server's endpoint and credentials cannot be changed (422 `oauth_server`)."""
    server = await service.update_server(session, keyring, checker, tenant.id, server_id, body)
    return server.to_public()


@router.delete("/{server_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a server")
@raises(ServerNotFound)
async def delete_server(server_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> Response:
    """Its credentials are deleted with it; emails already sent through it keep their record."""
    await service.delete_server(session, tenant.id, server_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{server_id}/verify",
    summary="Check the server again; its status becomes `active` or the failure found",
)
@raises(ServerNotFound)
async def verify_server(
    server_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    checker: CheckerDep,
    tokens: TokenKeeperDep,
) -> SmtpServerPublic:
    """The same check as on add, with the stored credentials (an OAuth server's refreshed
    access token). The outcome is the server's status and `last_check`, not an error: a server
    that fails answers 200 with status `auth_failed`, `tls_failed`, ... A paused server stays
    paused."""
    server = await service.verify_server(session, keyring, checker, tokens, tenant.id, server_id)
    return server.to_public()


@router.post("/{server_id}/pause", summary="Stop sending through this server")
@raises(ServerNotFound)
async def pause_server(
    server_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SmtpServerPublic:
    """Its queued emails go to the tenant's other servers; emails already handed to a sender
    may still leave through it."""
    return (await service.pause_server(session, tenant.id, server_id)).to_public()


@router.post(
    "/{server_id}/resume",
    summary="Send through this server again; it returns to the status of its last check",
)
@raises(ServerNotFound)
async def resume_server(
    server_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SmtpServerPublic:
    """Undoes a pause (and a pause for bounces): the status becomes what the last check found,
    `active` or its failure. Resuming a server that is not paused changes nothing."""
    return (await service.resume_server(session, tenant.id, server_id)).to_public()
