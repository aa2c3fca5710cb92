"""The tenant's suppression list: who must never be sent to again, and the checks that use it.

An email to a suppressed address (or to any address of a suppressed domain) is refused at
intake, stored with status `suppressed`, and checked again when the dispatcher claims it: an
address suppressed after the email was queued (a bounce, an unsubscribe) stops it too.
Matching ignores case: providers treat local parts case-insensitively, and a list that missed
`Lead@x.org` because `lead@x.org` bounced would defeat its purpose.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import String, Uuid, func, or_, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import events, lifecycle
from services.scheduler.lifecycle import Step
from services.scheduler.models import (
    Email,
    Suppression,
    SuppressionCreate,
    SuppressionSource,
)
from shared.db import among, insert_ignore_statement, table_of
from shared.errors import NotFound
from shared.metrics import SUPPRESSED
from shared.timeutil import new_id

RowT = TypeVar("RowT", bound=Any)  # a claimed row: has `id`, `tenant_id` and `to`


def address_key(address: str) -> tuple[str, str]:
    """(the address, its domain), both lower case, as the list stores them."""
    lowered = address.lower()
    return lowered, lowered.rpartition("@")[2]


async def suppressed_among(
    session: AsyncSession, tenant_id: uuid.UUID, addresses: Iterable[str]
) -> set[str]:
    """Of these addresses, the ones (lower case) the tenant's list suppresses."""
    keys = {address_key(a) for a in addresses}
    if not keys:
        return set()
    wanted_addresses = sorted({a for a, _ in keys})
    wanted_domains = sorted({d for _, d in keys})
    query = select(Suppression.address, Suppression.domain).where(
        Suppression.tenant_id == tenant_id,
        or_(
            col(Suppression.address).in_(wanted_addresses),
            col(Suppression.domain).in_(wanted_domains),
        ),
    )
    rows = (await session.exec(query)).all()
    by_address = {a for a, _ in rows if a}
    by_domain = {d for _, d in rows if d}
    return {a for a, d in keys if a in by_address or d in by_domain}


async def add(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    items: Sequence[SuppressionCreate],
    now: datetime,
) -> int:
    """Insert what is not on the list yet; return how many were new."""
    if not items:
        return 0
    table = table_of(Suppression)
    before = await _count(session, tenant_id)
    await session.exec(
        insert_ignore_statement(
            session,
            table,
            [
                {
                    "id": new_id(),
                    "tenant_id": tenant_id,
                    "address": item.address,
                    "domain": item.domain,
                    "reason": item.reason,
                    "source": item.source.value,
                    "created_at": now,
                }
                for item in items
            ],
        )
    )
    return await _count(session, tenant_id) - before


async def _count(session: AsyncSession, tenant_id: uuid.UUID) -> int:
    query = select(func.count()).where(Suppression.tenant_id == tenant_id)
    return int((await session.exec(query)).one())


async def suppress_address(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    address: str,
    source: SuppressionSource,
    reason: str,
    now: datetime,
) -> bool:
    """Put one address on the list (a bounce, a complaint, an unsubscribe); True if new.

    Emails to it still queued stop here rather than at their dispatch, so that a count of
    queued emails tells the truth at once.
    """
    item = SuppressionCreate.model_construct(
        address=address.lower(), domain=None, reason=reason[:500], source=source
    )
    added = await add(session, tenant_id, [item], now)
    await stop_queued_to(session, tenant_id, address, now)
    return added == 1


async def stop_queued_to(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    address: str | None,
    now: datetime,
    *,
    domain: str | None = None,
) -> int:
    """Mark the tenant's queued emails to `address` (or to any address at `domain`)
    `suppressed`; those already claimed are caught by the dispatcher's own check."""
    table = table_of(Email)
    recipient = func.lower(table.c.to)
    if address is not None:
        match = recipient == address.lower()
    else:
        assert domain is not None
        # clean_domain leaves only [a-z0-9.-]: nothing LIKE treats as a wildcard.
        match = recipient.like(f"%@{domain}")
    result = await session.exec(
        update(table)
        .where(
            table.c.tenant_id == tenant_id,
            table.c.status.in_(lifecycle.sources(Step.suppress)),
            match,
        )
        .values(status=lifecycle.target(Step.suppress), updated_at=now)
        .returning(table.c.id, table.c.campaign, table.c.attempts)
    )
    stopped = result.all()
    if stopped:
        SUPPRESSED.labels("queued").inc(len(stopped))
        await events.write(session, events.suppressed_events(tenant_id, stopped, now))
    return len(stopped)


async def drop_suppressed(
    session: AsyncSession, emails: Sequence[RowT], now: datetime
) -> list[RowT]:
    """Mark the claimed emails (of any tenants) whose recipient became suppressed; return the
    others. One query reads the lists of every tenant among them."""
    key_of = {e.id: (e.tenant_id, *address_key(e.to)) for e in emails}
    keys = set(key_of.values())
    if not keys:
        return list(emails)
    query = select(Suppression.tenant_id, Suppression.address, Suppression.domain).where(
        among(session, Suppression.tenant_id, sorted({t for t, _, _ in keys}), Uuid()),
        or_(
            among(session, Suppression.address, sorted({a for _, a, _ in keys}), String()),
            among(session, Suppression.domain, sorted({d for _, _, d in keys}), String()),
        ),
    )
    rows = (await session.exec(query)).all()
    if not rows:
        return list(emails)
    by_address = {(t, a) for t, a, _ in rows if a}
    by_domain = {(t, d) for t, _, d in rows if d}

    def suppressed(email: RowT) -> bool:
        tenant_id, address, domain = key_of[email.id]
        return (tenant_id, address) in by_address or (tenant_id, domain) in by_domain

    stopped = [e.id for e in emails if suppressed(e)]
    if not stopped:
        return list(emails)
    table = table_of(Email)
    result = await session.exec(
        update(table)
        .where(
            among(session, table.c.id, stopped, Uuid()),
            table.c.status.in_(lifecycle.sources(Step.suppress)),
        )
        .values(status=lifecycle.target(Step.suppress), updated_at=now)
        .returning(table.c.tenant_id, table.c.id, table.c.campaign, table.c.attempts)
    )
    by_tenant: dict[uuid.UUID, list[tuple[uuid.UUID, str | None, int]]] = {}
    for tenant_id, email_id, campaign, attempts in result.all():
        by_tenant.setdefault(tenant_id, []).append((email_id, campaign, attempts))
    await events.write(
        session,
        [
            event
            for tenant_id, rows in by_tenant.items()
            for event in events.suppressed_events(tenant_id, rows, now)
        ],
    )
    SUPPRESSED.labels("dispatch").inc(len(stopped))
    return [e for e in emails if not suppressed(e)]


class SuppressionNotFound(NotFound):
    """No entry with this id on this tenant's suppression list."""

    code = "suppression_not_found"
    default_detail = "No suppression 01900000-0000-7000-8000-000000000000 for this tenant."
    hint = "List the suppression list with GET /v1/suppressions."


def suppression_not_found(suppression_id: uuid.UUID) -> NotFound:
    return SuppressionNotFound(f"No suppression {suppression_id} for this tenant.")


async def get(
    session: AsyncSession, tenant_id: uuid.UUID, suppression_id: uuid.UUID
) -> Suppression:
    query = select(Suppression).where(
        Suppression.id == suppression_id, Suppression.tenant_id == tenant_id
    )
    row = (await session.exec(query)).first()
    if row is None:
        raise suppression_not_found(suppression_id)
    return row


async def find(
    session: AsyncSession, tenant_id: uuid.UUID, item: SuppressionCreate
) -> Suppression | None:
    query = select(Suppression).where(Suppression.tenant_id == tenant_id)
    if item.address is not None:
        query = query.where(Suppression.address == item.address)
    else:
        query = query.where(Suppression.domain == item.domain)
    return (await session.exec(query)).first()


async def page(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    *,
    source: SuppressionSource | None,
    after: uuid.UUID | None,
    limit: int,
) -> tuple[Sequence[Suppression], uuid.UUID | None]:
    query = select(Suppression).where(Suppression.tenant_id == tenant_id)
    if source is not None:
        query = query.where(Suppression.source == source)
    if after is not None:
        query = query.where(col(Suppression.id) > after)
    rows = (await session.exec(query.order_by(col(Suppression.id)).limit(limit + 1))).all()
    return rows[:limit], (rows[limit - 1].id if len(rows) > limit else None)
