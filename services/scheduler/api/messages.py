"""Emails: accepted in batches, stored before 202, then dispatched by the loop."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from services.scheduler import repository, service
from services.scheduler.deps import DispatcherDep, RegistryCopyDep, TenantDep
from services.scheduler.models import (
    Accepted,
    EmailCreate,
    EmailPage,
    EmailPublic,
    EmailStatus,
    MessageBatch,
)
from shared.db import SessionDep
from shared.errors import raises
from shared.pagination import (
    CursorQuery,
    InvalidCursor,
    Limit500Query,
    decode_cursor,
    encode_cursor,
)
from shared.spec import example_response
from shared.timeutil import utcnow

router = APIRouter(prefix="/v1/messages", tags=["messages"])


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


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=REQUEST_SCHEMA,
    summary="Queue one email or a batch of up to 1,000; 202 means stored",
)
@example_response(status.HTTP_202_ACCEPTED, ACCEPTED_EXAMPLE)
@raises(service.DuplicateIdempotencyKey, service.IdempotencyConflict)
async def accept_messages(
    payload: Annotated[Any, Body(include_in_schema=False)],
    tenant: TenantDep,
    session: SessionDep,
    dispatcher: DispatcherDep,
    copy: RegistryCopyDep,
) -> Accepted:
    """The body is one email or `{"messages": [...]}`; 202 means every email is stored (in one
    transaction), before any is sent. `items` answers each email in order: `queued`,
    `duplicate` or `suppressed` (the address or its domain is on the suppression list).

    Idempotency is per email, by its `idempotency_key` (not a header): an email whose key the
    tenant already used is not stored again, and its item is `duplicate` with the first
    email's id, so a batch sent again after a timeout queues nothing twice. A key twice in one
    batch is refused (409 `duplicate_idempotency_key`); two requests storing the same key at the
    same moment: one wins, the other gets 409 `idempotency_conflict` and may be sent again."""
    await copy.ensure_servers(tenant.id)
    return await service.accept(
        session, tenant.id, parse_payload(payload), utcnow(), dispatcher.wake
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
    rows, next_after = await service.list_emails(
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
    return (await service.get_email(session, tenant.id, email_id)).to_public()


@router.post("/{email_id}/cancel", summary="Cancel an email that has not been sent yet")
@raises(repository.EmailNotFound, service.NotCancelable)
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
    canceled = await service.cancel(session, tenant.id, email_id, utcnow())
    if canceled.notice is not None:
        # After the commit, which the session dependency does before the response.
        background.add_task(
            service.broadcast_cancel,
            request.app.state.bus,
            request.app.state.settings,
            canceled.notice,
        )
    return canceled.email.to_public()
