"""Emails: accepted in batches, stored before 202, then dispatched by the loop."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from services.scheduler import cancels, lifecycle, repository, suppression
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
from shared.db import SessionDep
from shared.errors import Conflict, raises
from shared.metrics import EMAILS_ACCEPTED, SUPPRESSED
from shared.pagination import (
    CursorQuery,
    InvalidCursor,
    Limit500Query,
    decode_cursor,
    encode_cursor,
)
from shared.registry_read import tenant_servers
from shared.spec import example_response
from shared.tenancy import TenantDep
from shared.timeutil import new_id, utcnow

logger = logging.getLogger("abl.scheduler.messages")

router = APIRouter(prefix="/v1/messages", tags=["messages"])


class DuplicateIdempotencyKey(Conflict):
    """The same `idempotency_key` appears twice in one batch."""

    code = "duplicate_idempotency_key"
    default_detail = "The same idempotency_key appears twice in this batch."
    hint = "Give each email of a batch its own idempotency_key."


class IdempotencyConflict(Conflict):
    """Another request with the same `idempotency_key` is being stored at this moment."""

    code = "idempotency_conflict"
    default_detail = "Another request with the same idempotency_key is being stored."
    hint = "Send the request again: it will return the first request's ids."


class NotCancelable(Conflict):
    """The email was already sent, or has finished otherwise."""

    code = "not_cancelable"
    default_detail = "This email is already sent."
    hint = "Only queued or scheduled emails can be canceled."


_batch = TypeAdapter(MessageBatch)
_single = TypeAdapter(EmailCreate)
BATCH_EXAMPLE = {
    "messages": [
        {
            "to": "ada@example.org",
            "subject": "A question about your newsletter",
            "text": "Hi Ada, a short question about your newsletter.",
            "campaign": "november",
            "idempotency_key": "november-ada",
        },
        {
            "to": "grace@example.org",
            "subject": "A question about your compiler",
            "text": "Hi Grace, a short question about your compiler.",
            "html": "<p>Hi Grace, a short question about your compiler.</p>",
            "campaign": "november",
            "idempotency_key": "november-grace",
        },
    ],
    "unsubscribe": True,
}
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
                },
                "examples": {
                    "batch": {"summary": "A batch of emails (up to 1,000)", "value": BATCH_EXAMPLE},
                    "single": {
                        "summary": "One email",
                        "value": {
                            "to": "linus@example.org",
                            "subject": "Hello",
                            "text": "Hi Linus.",
                            "reply_to": "sales@acme.com",
                        },
                    },
                },
            }
        },
    }
}
ACCEPTED_EXAMPLE = {
    "ids": ["0193a5d3-1111-7a00-8000-000000000001", "0193a5d3-1111-7a00-8000-000000000002"],
    "items": [
        {"id": "0193a5d3-1111-7a00-8000-000000000001", "status": "queued"},
        {"id": "0193a5d3-1111-7a00-8000-000000000002", "status": "queued"},
    ],
    "queued": 2,
    "duplicates": 0,
    "suppressed": 0,
    "active_servers": 3,
    "warning": None,
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
@example_response(status.HTTP_202_ACCEPTED, ACCEPTED_EXAMPLE)
@raises(DuplicateIdempotencyKey, IdempotencyConflict)
async def accept_messages(
    payload: Annotated[Any, Body(include_in_schema=False)],
    tenant: TenantDep,
    session: SessionDep,
    dispatcher: DispatcherDep,
) -> Accepted:
    """The body is one email or `{"messages": [...]}`; 202 means every email is stored (in one
    transaction), before any is sent. `items` answers each email in order: `queued`,
    `duplicate` or `suppressed` (the address or its domain is on the suppression list).

    Idempotency is per email, by its `idempotency_key` (not a header): an email whose key the
    tenant already used is not stored again, and its item is `duplicate` with the first
    email's id, so a batch sent again after a timeout queues nothing twice. A key twice in one
    batch is refused (409 `duplicate_idempotency_key`); two requests storing the same key at the
    same moment: one wins, the other gets 409 `idempotency_conflict` and may be sent again."""
    items = parse_payload(payload)
    keys = [item.idempotency_key for item in items if item.idempotency_key]
    if len(keys) != len(set(keys)):
        raise DuplicateIdempotencyKey()
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
        raise IdempotencyConflict()
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
@raises(InvalidCursor)
async def list_messages(
    tenant: TenantDep,
    session: SessionDep,
    status_filter: Annotated[EmailStatus | None, Query(alias="status")] = None,
    campaign: Annotated[str | None, Query(max_length=100)] = None,
    server_id: uuid.UUID | None = None,
    limit: Limit500Query = 100,
    cursor: CursorQuery = None,
) -> EmailPage:
    """Filtered by `status`, `campaign` and `server_id`. Paginated: up to `limit` emails per
    page; pass `next_cursor` as `cursor` for the next page (null on the last)."""
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
@raises(repository.EmailNotFound)
async def get_message(email_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> EmailPublic:
    """Another tenant's id answers 404 like an id that does not exist."""
    return (await repository.get_email(session, tenant.id, email_id)).to_public()


@router.post("/{email_id}/cancel", summary="Cancel an email that has not been sent yet")
@raises(repository.EmailNotFound, NotCancelable)
async def cancel_message(
    email_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    request: Request,
    background: BackgroundTasks,
) -> EmailPublic:
    """A queued or scheduled email becomes `canceled`; one already handed to a sender is
    skipped by it unless its SMTP transaction has started (then `sent` wins). Anything else
    answers 409 `not_cancelable`."""
    canceled = await cancels.cancel(session, tenant.id, email_id, utcnow())
    if canceled is None:
        email = await repository.get_email(session, tenant.id, email_id)  # 404 if not there
        raise NotCancelable(f"This email is already {email.status}.")
    _, notice = canceled
    if notice is not None:
        # Its job is on its way to a sender: every sender is told after the commit, which the
        # session dependency does before the response.
        background.add_task(
            cancels.broadcast, request.app.state.bus, request.app.state.settings, notice
        )
    return (await repository.get_email(session, tenant.id, email_id)).to_public()
