"""Endpoints for the senders, authenticated by `ABL_INTERNAL_TOKEN`. Never public."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from sqlmodel import SQLModel, select

from services.scheduler.models import Email, EmailStatus
from shared.db import SessionDep
from shared.errors import PROBLEM_RESPONSES
from shared.tenancy import InternalDep

router = APIRouter(
    prefix="/internal/v1",
    tags=["internal"],
    dependencies=[InternalDep],
    responses=PROBLEM_RESPONSES,
)


class JobState(SQLModel):
    email_id: uuid.UUID
    status: EmailStatus | None
    sendable: bool


@router.get(
    "/emails/{email_id}/jobs/{job_id}",
    summary="May a sender deliver this job? Only while it is the email's current attempt",
)
async def job_state(email_id: uuid.UUID, job_id: uuid.UUID, session: SessionDep) -> JobState:
    # Two columns only: the email's body may be a megabyte and is not needed here.
    query = select(Email.status, Email.job_id).where(Email.id == email_id)
    row = (await session.exec(query)).first()
    if row is None:
        return JobState(email_id=email_id, status=None, sendable=False)
    status, current_job = row
    return JobState(
        email_id=email_id,
        status=EmailStatus(status),
        sendable=status == EmailStatus.scheduled and current_job == job_id,
    )
