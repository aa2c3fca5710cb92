"""Endpoints for the senders, authenticated by `ABL_INTERNAL_TOKEN`. Never public."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from sqlmodel import Field, SQLModel

from services.scheduler import repository
from services.scheduler.results import ResultApplier
from shared.db import SessionDep
from shared.messages import SendResult
from shared.tenancy import InternalDep

router = APIRouter(prefix="/internal/v1", dependencies=[InternalDep])

MAX_JOBS_PER_QUESTION = 1000


class JobRef(SQLModel):
    email_id: uuid.UUID
    job_id: uuid.UUID


class SendableQuery(SQLModel):
    jobs: list[JobRef] = Field(max_length=MAX_JOBS_PER_QUESTION)


class SendableAnswer(SQLModel):
    sendable: list[uuid.UUID]


class ResultsReport(SQLModel):
    results: list[SendResult] = Field(max_length=MAX_JOBS_PER_QUESTION)


class ResultsApplied(SQLModel):
    applied: list[bool]


@router.post(
    "/results",
    tags=["results"],
    summary="Results a sender could not publish while the broker was away",
)
async def report_send_results(report: ResultsReport, request: Request) -> ResultsApplied:
    """`applied` says, in order, which results changed their email (false: another attempt's,
    or already applied)."""
    # Applied like the broker's result events: only to the attempt each one names, so a copy
    # that also arrives through the broker later changes nothing.
    applier: ResultApplier = request.app.state.result_applier
    return ResultsApplied(applied=await applier.apply_many(report.results))


@router.post(
    "/jobs/sendable",
    tags=["jobs"],
    summary="Which of these jobs may a sender still deliver? Those still their email's attempt",
)
async def filter_sendable_jobs(query: SendableQuery, session: SessionDep) -> SendableAnswer:
    """Up to 1,000 jobs per question; `sendable` lists the email ids whose job may be sent."""
    # Asked only for redelivered or re-published jobs, many at once after a broker restart.
    jobs = [(ref.email_id, ref.job_id) for ref in query.jobs]
    return SendableAnswer(sendable=sorted(await repository.sendable_jobs(session, jobs)))
