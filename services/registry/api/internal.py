"""Endpoints for the other services, authenticated by `ABL_INTERNAL_TOKEN`. Never public."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from services.registry import credentials as use_cases
from services.registry.deps import KeyringDep, TokenKeeperDep
from services.registry.domain import ServerStatus
from services.registry.models import HealthAck, HealthReport
from services.registry.oauth.tokens import TokenUnavailable
from shared.db import SessionDep
from shared.errors import ServiceUnavailable, raises
from shared.messages import SmtpCredentials
from shared.registry_read import ServerNotFound, server_not_found
from shared.tenancy import InternalDep

router = APIRouter(prefix="/internal/v1", dependencies=[InternalDep])


class OAuthProviderUnavailable(ServiceUnavailable):
    """The OAuth provider could not refresh this server's access token now."""

    code = "oauth_provider_unavailable"
    default_detail = "The OAuth provider could not refresh this server's access token now."
    hint = "Try again shortly."


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
        raise OAuthProviderUnavailable() from None
    if credentials is None:
        raise server_not_found(server_id)
    return credentials


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
    return await _credentials(session, keyring, tokens, server_id, response, None)


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
    return await _credentials(
        session, keyring, tokens, server_id, response, body.rejected_token_sha256
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
    server = await use_cases.record_health(session, server_id, body.status, body.reply)
    return HealthAck(id=server.id, status=ServerStatus(server.status))
