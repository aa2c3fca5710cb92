"""The scheduler's use cases for a tenant's emails: accept, list, cancel. Routes parse the
request, call one of these and render the answer; the errors raised here are the hierarchy of
`shared.errors`, mapped to HTTP there."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import lifecycle, repository, suppression
from services.scheduler.lifecycle import Step
from services.scheduler.models import (
    Accepted,
    AcceptedItem,
    Email,
    EmailCreate,
    EmailStatus,
    ItemStatus,
)
from services.scheduler.registry_copy import tenant_servers
from shared.broker import Bus
from shared.errors import Conflict
from shared.messages import CancelNotice
from shared.metrics import EMAILS_ACCEPTED, SUPPRESSED
from shared.settings import BrokerSettings
from shared.timeutil import new_id

logger = logging.getLogger("abl.scheduler.messages")

NO_ACTIVE_SERVER = "No active server: the emails stay queued until one is added or resumed."


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


def message_id_for(email_id: uuid.UUID) -> str:
    # Stable across retries; the sender adds the From domain to make the Message-ID header.
    return f"abl.{email_id.hex}"


def _row(
    tenant_id: uuid.UUID, email_id: uuid.UUID, item: EmailCreate, refused: bool, now: datetime
) -> dict[str, Any]:
    # A plain row for one multi-row INSERT: an ORM object per email cost more CPU than the rest
    # of the request.
    return {
        "id": email_id,
        "tenant_id": tenant_id,
        # A suppressed email is stored all the same, so that its id answers and the refusal is
        # on record.
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


async def accept(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    items: Sequence[EmailCreate],
    now: datetime,
    wake: asyncio.Event,
) -> Accepted:
    """Store every email of the batch in the caller's transaction (an idempotency key the
    tenant already used answers the first email's id instead), then wake the dispatcher."""
    keys = [item.idempotency_key for item in items if item.idempotency_key]
    if len(keys) != len(set(keys)):
        raise DuplicateIdempotencyKey()
    known = await repository.emails_by_keys(session, tenant_id, keys)
    blocked = await suppression.suppressed_among(session, tenant_id, (i.to for i in items))
    ids: list[uuid.UUID] = []
    results: list[AcceptedItem] = []
    fresh: list[dict[str, Any]] = []
    for item in items:
        if item.idempotency_key and item.idempotency_key in known:
            ids.append(known[item.idempotency_key])
            results.append(AcceptedItem(id=ids[-1], status=ItemStatus.duplicate))
            continue
        refused = item.to.lower() in blocked
        email_id = new_id()
        fresh.append(_row(tenant_id, email_id, item, refused, now))
        ids.append(email_id)
        status = ItemStatus.suppressed if refused else ItemStatus.queued
        results.append(AcceptedItem(id=email_id, status=status))
    if fresh and not await repository.add_emails(session, fresh):
        raise IdempotencyConflict()
    servers = [s for s in await tenant_servers(session, tenant_id) if s.sendable]
    suppressed = sum(1 for r in results if r.status == ItemStatus.suppressed)
    EMAILS_ACCEPTED.inc(len(fresh) - suppressed)
    if suppressed:
        SUPPRESSED.labels("intake").inc(suppressed)
    wake.set()
    return Accepted(
        ids=ids,
        items=results,
        queued=len(fresh) - suppressed,
        duplicates=len(items) - len(fresh),
        suppressed=suppressed,
        active_servers=len(servers),
        warning=None if servers else NO_ACTIVE_SERVER,
    )


# Reads are the repository's queries as they are: nothing to decide.
list_emails = repository.list_emails
get_email = repository.get_email


@dataclass(frozen=True)
class Canceled:
    email: Email
    # Set when the email's job was already on its way to a sender: every sender must be told,
    # after the commit.
    notice: CancelNotice | None


async def stop(
    session: AsyncSession, tenant_id: uuid.UUID, email_id: uuid.UUID, now: datetime
) -> tuple[str, CancelNotice | None] | None:
    """Cancel a queued or scheduled email: (the status it had, the notice every sender must
    hear after the commit when its job is already on its way to one), or None when it was in
    neither state. The cancel route's core, and what a reply or bounce does to the emails of
    the sequence it stops."""
    canceled = await repository.cancel_email(session, tenant_id, email_id, now)
    if canceled is None:
        return None
    previous, job_id = canceled
    if previous == EmailStatus.scheduled and job_id is not None:
        # The sender holding the job reports it "canceled before sending", which gives the
        # reservation back; one already in the SMTP transaction finishes it, and `sent` wins.
        return previous, CancelNotice(email_id=email_id, job_id=job_id)
    return previous, None


async def cancel(
    session: AsyncSession, tenant_id: uuid.UUID, email_id: uuid.UUID, now: datetime
) -> Canceled:
    """A queued or scheduled email becomes `canceled`; anything else is `NotCancelable`."""
    stopped = await stop(session, tenant_id, email_id, now)
    if stopped is None:
        email = await repository.get_email(session, tenant_id, email_id)  # not found, or done
        raise NotCancelable(f"This email is already {email.status}.")
    return Canceled(await repository.get_email(session, tenant_id, email_id), stopped[1])


async def broadcast_cancel(bus: Bus, settings: BrokerSettings, notice: CancelNotice) -> None:
    try:
        await bus.broadcast(
            settings.cancels_topic, notice.model_dump_json().encode(), message_id=str(notice.job_id)
        )
    except Exception as exc:  # best effort: the job may then be sent, and its result says so
        logger.warning("cancel of job %s not broadcast: %s", notice.job_id, type(exc).__name__)
