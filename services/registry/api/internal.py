"""Endpoints for the other services, authenticated by `ABL_INTERNAL_TOKEN`. Never public."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from services.registry import credentials as use_cases
from services.registry.deps import KeyringDep
from services.registry.domain import ServerStatus
from services.registry.models import HealthAck, HealthReport
from shared.db import SessionDep
from shared.errors import PROBLEM_RESPONSES
from shared.messages import SmtpCredentials
from shared.registry_read import server_not_found
from shared.tenancy import InternalDep

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
    response.headers["Cache-Control"] = "no-store"
    credentials = await use_cases.server_credentials(session, keyring, server_id)
    if credentials is None:
        raise server_not_found(server_id)
    return credentials


@router.post(
    "/servers/{server_id}/health",
    summary="A sender reports that a server refused its credentials",
)
async def report_health(server_id: uuid.UUID, body: HealthReport, session: SessionDep) -> HealthAck:
    server = await use_cases.record_health(session, server_id, body.status, body.reply)
    return HealthAck(id=server.id, status=ServerStatus(server.status))
