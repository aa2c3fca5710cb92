"""Canceling an email that may already be with a sender: the guarded status change
(`repository.cancel_email`) and, for one whose job is out, the notice every sender hears after
the commit. Used by the cancel route and by a sequence that a reply or bounce stops."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import repository
from services.scheduler.models import EmailStatus
from shared.broker import Bus
from shared.messages import CancelNotice
from shared.settings import BrokerSettings

logger = logging.getLogger("abl.scheduler.cancels")


async def cancel(
    session: AsyncSession, tenant_id: uuid.UUID, email_id: uuid.UUID, now: datetime
) -> tuple[str, CancelNotice | None] | None:
    """Cancel a queued or scheduled email: (the status it had, the notice to broadcast after
    the commit when its job is on its way to a sender), or None when it was in neither
    state."""
    canceled = await repository.cancel_email(session, tenant_id, email_id, now)
    if canceled is None:
        return None
    previous, job_id = canceled
    if previous == EmailStatus.scheduled and job_id is not None:
        # The sender holding the job reports it "canceled before sending", which gives the
        # reservation back; one already in the SMTP transaction finishes it, and `sent` wins.
        return previous, CancelNotice(email_id=email_id, job_id=job_id)
    return previous, None


async def broadcast(bus: Bus, settings: BrokerSettings, notice: CancelNotice) -> None:
    try:
        await bus.broadcast(
            settings.cancels_topic, notice.model_dump_json().encode(), message_id=str(notice.job_id)
        )
    except Exception as exc:  # best effort: the job may then be sent, and its result says so
        logger.warning("cancel of job %s not broadcast: %s", notice.job_id, type(exc).__name__)
