"""Endpoints for the senders, authenticated by `ABL_INTERNAL_TOKEN`. Never public."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from sqlmodel import Field, SQLModel

from services.scheduler import repository
from shared.db import SessionDep
from shared.errors import PROBLEM_RESPONSES
from shared.tenancy import InternalDep

router = APIRouter(
    prefix="/internal/v1",
    tags=["internal"],
    dependencies=[InternalDep],
    responses=PROBLEM_RESPONSES,
)

MAX_JOBS_PER_QUESTION = 1000


class JobRef(SQLModel):
    email_id: uuid.UUID
    job_id: uuid.UUID


class SendableQuery(SQLModel):
    jobs: list[JobRef] = Field(max_length=MAX_JOBS_PER_QUESTION)


class SendableAnswer(SQLModel):
    sendable: list[uuid.UUID]


@router.post(
    "/jobs/sendable",
    summary="Which of these jobs may a sender still deliver? Those still their email's attempt",
)
async def sendable_jobs(query: SendableQuery, session: SessionDep) -> SendableAnswer:
    # Asked only for redelivered or re-published jobs, many at once after a broker restart.
    jobs = [(ref.email_id, ref.job_id) for ref in query.jobs]
    return SendableAnswer(sendable=sorted(await repository.sendable_jobs(session, jobs)))
