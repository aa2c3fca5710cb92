"""The registry's events: a server whose status changes writes `server.status_changed` to the
registry's outbox in the same flush, whichever use case changed it (a check, pause, resume, a
sender's report, a refused OAuth refresh), so no path can forget to tell."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, object_session
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import changes
from services.registry.models import RegistryOutbox, SmtpServer
from shared import outbox
from shared.db import table_of
from shared.events import server_status_event
from shared.timeutil import utcnow

OUTBOX = table_of(RegistryOutbox)


def _status_changed(_mapper: Mapper[Any], connection: Connection, server: SmtpServer) -> None:
    history = inspect(server).attrs.status.history
    if not history.has_changes():
        return
    previous = str(history.deleted[0]) if history.deleted else None
    current = str(server.status)
    if previous == current:
        return
    change = server_status_event(
        tenant_id=server.tenant_id,
        server_id=server.id,
        status=current,
        previous=previous,
        reason=server.last_check_code,
        at=utcnow(),
    )
    connection.execute(OUTBOX.insert(), outbox.rows([change]))
    session = object_session(server)
    if session is not None:
        outbox.mark_written(session, OUTBOX.name)


async def record_change(
    session: AsyncSession,
    server: SmtpServer,
    previous: str | None,
    current: str,
    reason: str | None,
) -> None:
    """For a status changed by a Core statement, which the mapper event does not see."""
    change = server_status_event(
        tenant_id=server.tenant_id,
        server_id=server.id,
        status=current,
        previous=previous,
        reason=reason,
        at=utcnow(),
    )
    await session.exec(OUTBOX.insert(), params=outbox.rows([change]))
    outbox.mark_written(session.sync_session, OUTBOX.name)
    await changes.server_changed(session, server.id)


def install() -> None:
    """Idempotent; called when a registry starts, not at import."""
    if not event.contains(SmtpServer, "after_update", _status_changed):
        event.listen(SmtpServer, "after_update", _status_changed)
