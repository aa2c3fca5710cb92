"""Endpoints for the other services, authenticated by `ABL_INTERNAL_TOKEN`. Never public."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from services.registry import repository
from services.registry.deps import KeyringDep
from services.registry.domain import Security, ServerStatus
from services.registry.models import HealthAck, HealthReport
from shared.db import SessionDep
from shared.errors import PROBLEM_RESPONSES
from shared.messages import SmtpCredentials
from shared.tenancy import InternalDep
from shared.timeutil import utcnow

router = APIRouter(
    prefix="/internal/v1",
    tags=["internal"],
    dependencies=[InternalDep],
    responses=PROBLEM_RESPONSES,
)


@router.get(
    "/servers/{server_id}/credentials",
    summary="One server's decrypted credentials, for the senders",
)
async def server_credentials(
    server_id: uuid.UUID, session: SessionDep, keyring: KeyringDep, response: Response
) -> SmtpCredentials:
    server = await repository.get_server_any_tenant(session, server_id)
    response.headers["Cache-Control"] = "no-store"
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


@router.post(
    "/servers/{server_id}/health",
    summary="A sender reports that a server refused its credentials",
)
async def report_health(server_id: uuid.UUID, body: HealthReport, session: SessionDep) -> HealthAck:
    server = await repository.get_server_any_tenant(session, server_id)
    server.last_check_code = body.status.value
    server.last_check_reply = body.reply[:512]
    server.last_checked_at = utcnow()
    if server.status != ServerStatus.paused:
        server.status = body.status
    server.updated_at = utcnow()
    session.add(server)
    return HealthAck(id=server.id, status=ServerStatus(server.status))
