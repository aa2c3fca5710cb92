"""Endpoints for the senders, authenticated by `ABL_INTERNAL_TOKEN`. Never public."""

from __future__ import annotations

from fastapi import APIRouter, Request

from services.scheduler import repository
from services.scheduler.results import ResultApplier
from shared.db import SessionDep
from shared.messages import ResultsApplied, ResultsReport, SendableAnswer, SendableQuery
from shared.tenancy import InternalDep

router = APIRouter(prefix="/internal/v1", dependencies=[InternalDep])


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
