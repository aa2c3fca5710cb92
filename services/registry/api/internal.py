"""Endpoints for the other services, authenticated by `ABL_INTERNAL_TOKEN`. Never public."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from services.registry import credentials as use_cases
from services.registry import mailbox
from services.registry.deps import KeyringDep, TokenKeeperDep
from services.registry.domain import ServerStatus
from services.registry.models import HealthAck, HealthReport
from services.registry.oauth.tokens import TokenUnavailable
from shared.db import SessionDep
from shared.errors import PROBLEM_RESPONSES, NotFound, ServiceUnavailable
from shared.messages import BouncePause, ImapCredentials, MailboxPoll, SmtpCredentials
from shared.registry_read import server_not_found
from shared.tenancy import InternalDep

router = APIRouter(
    prefix="/internal/v1",
    tags=["internal"],
    dependencies=[InternalDep],
    responses=PROBLEM_RESPONSES,
)


class TokenRejected(BaseModel):
    rejected_token_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (hex) of the access token the SMTP server refused.",
    )


async def _credentials(
    session: SessionDep,
    keyring: KeyringDep,
    tokens: TokenKeeperDep,
    server_id: uuid.UUID,
    response: Response,
    rejected: str | None,
) -> SmtpCredentials:
    response.headers["Cache-Control"] = "no-store"
    try:
        credentials = await use_cases.server_credentials(
            session, keyring, tokens, server_id, rejected_token=rejected
        )
    except TokenUnavailable:
        # The sender waits with backoff and asks again; the server is not at fault.
        raise ServiceUnavailable(
            "The OAuth provider could not refresh this server's access token now.",
            code="oauth_provider_unavailable",
            hint="Try again shortly.",
        ) from None
    if credentials is None:
        raise server_not_found(server_id)
    return credentials


@router.get(
    "/servers/{server_id}/credentials",
    summary="One server's credentials for the senders: its password, or a fresh access token",
)
async def server_credentials(
    server_id: uuid.UUID,
    session: SessionDep,
    keyring: KeyringDep,
    tokens: TokenKeeperDep,
    response: Response,
) -> SmtpCredentials:
    return await _credentials(session, keyring, tokens, server_id, response, None)


@router.post(
    "/servers/{server_id}/credentials/refresh",
    summary="An OAuth server refused this access token: a new one (refreshed once for all)",
)
async def refresh_credentials(
    server_id: uuid.UUID,
    body: TokenRejected,
    session: SessionDep,
    keyring: KeyringDep,
    tokens: TokenKeeperDep,
    response: Response,
) -> SmtpCredentials:
    return await _credentials(
        session, keyring, tokens, server_id, response, body.rejected_token_sha256
    )


@router.post(
    "/servers/{server_id}/health",
    summary="A sender reports that a server refused its credentials",
)
async def report_health(server_id: uuid.UUID, body: HealthReport, session: SessionDep) -> HealthAck:
    server = await use_cases.record_health(session, server_id, body.status, body.reply)
    return HealthAck(id=server.id, status=ServerStatus(server.status))


@router.get(
    "/servers/{server_id}/imap-credentials",
    summary="One server's mailbox access, for the scheduler's mailbox reader",
)
async def imap_credentials(
    server_id: uuid.UUID, session: SessionDep, keyring: KeyringDep, response: Response
) -> ImapCredentials:
    response.headers["Cache-Control"] = "no-store"
    found = await mailbox.imap_credentials(session, keyring, server_id)
    if found is None:
        raise NotFound(
            f"Server {server_id} does not exist or reads no mailbox.",
            code="mailbox_not_found",
            hint="Only servers with an `imap` object have a mailbox to read.",
        )
    return found


@router.post(
    "/servers/{server_id}/mailbox-poll",
    status_code=204,
    summary="The mailbox reader reports one read of a server's INBOX (time and error)",
)
async def report_mailbox_poll(server_id: uuid.UUID, body: MailboxPoll, session: SessionDep) -> None:
    if not await mailbox.record_poll(session, server_id, body.polled_at, body.error):
        raise server_not_found(server_id)


@router.post(
    "/servers/{server_id}/bounce-pause",
    summary="The bounce-rate guard pauses a server (`paused_bounces`, with the reason)",
)
async def pause_for_bounces(
    server_id: uuid.UUID, body: BouncePause, session: SessionDep
) -> HealthAck:
    server = await use_cases.pause_for_bounces(session, server_id, body.reason)
    if server is None:
        raise server_not_found(server_id)
    return HealthAck(id=server.id, status=ServerStatus(server.status))
