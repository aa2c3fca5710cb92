"""The tenant's suppression list: addresses and domains that are never sent to."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Response, status
from fastapi.openapi.models import Example

from services.scheduler import suppression
from services.scheduler.deps import TenantDep
from services.scheduler.models import (
    SuppressionBatch,
    SuppressionCreate,
    SuppressionImported,
    SuppressionPage,
    SuppressionPublic,
    SuppressionSource,
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
from shared.timeutil import utcnow

router = APIRouter(prefix="/v1/suppressions", tags=["suppressions"])


@router.get("", summary="The suppression list, oldest first")
@raises(InvalidCursor)
async def list_suppressions(
    tenant: TenantDep,
    session: SessionDep,
    source: SuppressionSource | None = None,
    limit: Limit500Query = 100,
    cursor: CursorQuery = None,
) -> SuppressionPage:
    """Filtered by `source`. Paginated: up to `limit` entries per page; pass `next_cursor` as
    `cursor` for the next page (null on the last)."""
    rows, next_after = await suppression.page(
        session,
        tenant.id,
        source=source,
        after=decode_cursor(cursor) if cursor else None,
        limit=limit,
    )
    return SuppressionPage(
        items=[row.to_public() for row in rows],
        next_cursor=encode_cursor(next_after) if next_after else None,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"description": "Already on the list: the existing entry"}},
    summary="Suppress an address or a whole domain; queued emails to it stop",
)
async def add_suppression(
    body: Annotated[
        SuppressionCreate,
        Body(
            openapi_examples={
                "address": Example(
                    summary="One address", value={"address": "ada@example.org", "reason": "asked"}
                ),
                "domain": Example(summary="A whole domain", value={"domain": "competitor.example"}),
            }
        ),
    ],
    tenant: TenantDep,
    session: SessionDep,
    response: Response,
) -> SuppressionPublic:
    """201 with the new entry, or 200 with the existing one when it is already listed. Queued
    emails to the address (or the domain) become `suppressed`; new ones are refused at intake."""
    now = utcnow()
    if not await suppression.add(session, tenant.id, [body], now):
        response.status_code = status.HTTP_200_OK
    await suppression.stop_queued_to(session, tenant.id, body.address, now, domain=body.domain)
    row = await suppression.find(session, tenant.id, body)
    assert row is not None
    return row.to_public()


@router.post(
    "/import",
    summary="Suppress up to 1,000 addresses or domains at once (what ablctl's CSV import sends)",
)
async def import_suppressions(
    body: SuppressionBatch, tenant: TenantDep, session: SessionDep
) -> SuppressionImported:
    """Entries already listed are counted in `already_known`, not added twice."""
    now = utcnow()
    added = await suppression.add(session, tenant.id, body.items, now)
    for item in body.items:
        await suppression.stop_queued_to(session, tenant.id, item.address, now, domain=item.domain)
    return SuppressionImported(added=added, already_known=len(body.items) - added)


@router.get("/{suppression_id:uuid}", summary="One entry of the suppression list")
@raises(suppression.SuppressionNotFound)
async def get_suppression(
    suppression_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SuppressionPublic:
    """Another tenant's id answers 404 like an id that does not exist."""
    return (await suppression.get(session, tenant.id, suppression_id)).to_public()


@router.delete(
    "/{suppression_id:uuid}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Take an entry off the list: emails to it may be sent again",
)
@raises(suppression.SuppressionNotFound)
async def delete_suppression(
    suppression_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> Response:
    """Emails already marked `suppressed` stay so; new ones to the address are accepted."""
    row = await suppression.get(session, tenant.id, suppression_id)
    await session.delete(row)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
