"""Emails: accepted in batches, stored before 202, then dispatched by the loop."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from services.scheduler import lifecycle, repository, suppression
from services.scheduler.deps import DispatcherDep
from services.scheduler.lifecycle import Step
from services.scheduler.models import (
    Accepted,
    AcceptedItem,
    EmailCreate,
    EmailPage,
    EmailPublic,
    EmailStatus,
    ItemStatus,
    MessageBatch,
)
from shared.broker import Bus
from shared.db import SessionDep
from shared.errors import PROBLEM_RESPONSES, Conflict, problem_doc
from shared.messages import CancelNotice
from shared.metrics import EMAILS_ACCEPTED, SUPPRESSED
from shared.pagination import CURSOR_PATTERN, decode_cursor, encode_cursor
from shared.registry_read import tenant_servers
from shared.settings import BrokerSettings
from shared.tenancy import TenantDep
from shared.timeutil import new_id, utcnow

logger = logging.getLogger("abl.scheduler.messages")

router = APIRouter(prefix="/v1/messages", tags=["messages"], responses=PROBLEM_RESPONSES)

_batch = TypeAdapter(MessageBatch)
_single = TypeAdapter(EmailCreate)
REQUEST_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/EmailCreate"},
                        {"$ref": "#/components/schemas/MessageBatch"},
                    ]
                }
            }
        },
    }
}


def parse_payload(payload: Any) -> list[EmailCreate]:
    """One email, or `{"messages": [...]}`; errors name the item's index."""
    is_batch = isinstance(payload, dict) and "messages" in payload
    try:
        if is_batch:
            return _batch.validate_python(payload).messages
        return [_single.validate_python(payload)]
    except ValidationError as exc:
        errors = [
            {
                # `input` stays for the problem renderer, which never echoes it but checks
                # that no message quotes it.
                **{k: v for k, v in error.items() if k not in ("ctx", "url")},
                "loc": ("body", *error["loc"]),
            }
            for error in exc.errors()
        ]
        raise RequestValidationError(errors) from exc


def message_id_for(email_id: uuid.UUID) -> str:
    # Stable across retries; the sender adds the From domain to make the Message-ID header.
    return f"abl.{email_id.hex}"


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=REQUEST_SCHEMA,
    summary="Queue one email or a batch of up to 1,000; 202 means stored",
)
async def accept_messages(
    payload: Annotated[Any, Body(include_in_schema=False)],
    tenant: TenantDep,
    session: SessionDep,
    dispatcher: DispatcherDep,
) -> Accepted:
    items = parse_payload(payload)
    keys = [item.idempotency_key for item in items if item.idempotency_key]
    if len(keys) != len(set(keys)):
        raise Conflict(
            "The same idempotency_key appears twice in this batch.",
            code="duplicate_idempotency_key",
            hint="Give each email of a batch its own idempotency_key.",
        )
    known = await repository.emails_by_keys(session, tenant.id, keys)
    blocked = await suppression.suppressed_among(session, tenant.id, (i.to for i in items))
    now = utcnow()
    ids: list[uuid.UUID] = []
    results: list[AcceptedItem] = []
    fresh: list[dict[str, Any]] = []
    for item in items:
        if item.idempotency_key and item.idempotency_key in known:
            ids.append(known[item.idempotency_key])
            results.append(AcceptedItem(id=ids[-1], status=ItemStatus.duplicate))
            continue
        # Plain rows for one multi-row INSERT: an ORM object per email cost more CPU than the
        # rest of the request.
        refused = item.to.lower() in blocked
        email_id = new_id()
        fresh.append(
            {
                "id": email_id,
                "tenant_id": tenant.id,
                # Stored all the same, so that its id answers and the refusal is on record.
                "status": lifecycle.after(None, Step.refuse_suppressed if refused else Step.accept),
                "to": item.to,
                "subject": item.subject,
                "text": item.text,
                "html": item.html,
                "reply_to": item.reply_to,
                "campaign": item.campaign,
                "sequence": item.sequence,
                "unsubscribe": item.unsubscribe,
                "headers": item.headers,
                "idempotency_key": item.idempotency_key,
                "message_id": message_id_for(email_id),
                "attempts": 0,
                "not_before": now,
                "created_at": now,
                "updated_at": now,
            }
        )
        ids.append(email_id)
        results.append(
            AcceptedItem(
                id=email_id, status=ItemStatus.suppressed if refused else ItemStatus.queued
            )
        )
    if fresh and not await repository.add_emails(session, fresh):
        raise Conflict(
            "Another request with the same idempotency_key is being stored.",
            code="idempotency_conflict",
            hint="Send the request again: it will return the first request's ids.",
        )
    servers = [s for s in await tenant_servers(session, tenant.id) if s.sendable]
    suppressed = sum(1 for r in results if r.status == ItemStatus.suppressed)
    EMAILS_ACCEPTED.inc(len(fresh) - suppressed)
    if suppressed:
        SUPPRESSED.labels("intake").inc(suppressed)
    dispatcher.wake.set()
    return Accepted(
        ids=ids,
        items=results,
        queued=len(fresh) - suppressed,
        duplicates=len(items) - len(fresh),
        suppressed=suppressed,
        active_servers=len(servers),
        warning=None
        if servers
        else "No active server: the emails stay queued until one is added or resumed.",
    )


@router.get("", summary="List emails, oldest first, with filters")
async def list_messages(
    tenant: TenantDep,
    session: SessionDep,
    status_filter: Annotated[EmailStatus | None, Query(alias="status")] = None,
    campaign: Annotated[str | None, Query(max_length=100)] = None,
    server_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN)] = None,
) -> EmailPage:
    rows, next_after = await repository.list_emails(
        session,
        tenant.id,
        status=status_filter,
        campaign=campaign,
        server_id=server_id,
        after=decode_cursor(cursor) if cursor else None,
        limit=limit,
    )
    return EmailPage(
        items=[row.to_public() for row in rows],
        next_cursor=encode_cursor(next_after) if next_after else None,
    )


@router.get("/{email_id}", summary="One email: status, server, attempts, last SMTP reply")
async def get_message(email_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> EmailPublic:
    return (await repository.get_email(session, tenant.id, email_id)).to_public()


@router.post(
    "/{email_id}/cancel",
    responses={409: problem_doc("Already sent or finished")},
    summary="Cancel an email that has not been sent yet",
)
async def cancel_message(
    email_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    request: Request,
    background: BackgroundTasks,
) -> EmailPublic:
    canceled = await repository.cancel_email(session, tenant.id, email_id, utcnow())
    if canceled is None:
        email = await repository.get_email(session, tenant.id, email_id)  # 404 if not there
        raise Conflict(
            f"This email is already {email.status}.",
            code="not_cancelable",
            hint="Only queued or scheduled emails can be canceled.",
        )
    previous, job_id = canceled
    if previous == EmailStatus.scheduled and job_id is not None:
        # Its job is on its way to a sender: every sender is told (after the commit, which the
        # session dependency does before the response), and the one holding the job reports it
        # "canceled before sending", which gives the reservation back. A sender already in the
        # SMTP transaction finishes it, and then `sent` wins.
        notice = CancelNotice(email_id=email_id, job_id=job_id)
        background.add_task(
            broadcast_cancel, request.app.state.bus, request.app.state.settings, notice
        )
    return (await repository.get_email(session, tenant.id, email_id)).to_public()


async def broadcast_cancel(bus: Bus, settings: BrokerSettings, notice: CancelNotice) -> None:
    try:
        await bus.broadcast(
            settings.cancels_topic, notice.model_dump_json().encode(), message_id=str(notice.job_id)
        )
    except Exception as exc:  # best effort: the job may then be sent, and its result says so
        logger.warning("cancel of job %s not broadcast: %s", notice.job_id, type(exc).__name__)
