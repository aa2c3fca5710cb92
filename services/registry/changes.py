"""The registry's side of the copies other services keep of its tenants and servers
(`shared/registry_changes.py`).

Every change of a copied column raises the row's `version` in the database and writes a
`RegistryChange` with the row as it now is to `registry_changes_outbox`, in the same flush:
mapper events catch the ORM's inserts, updates and deletes whatever use case made them, and
`server_changed` serves the conditional Core UPDATEs (`services.registry.events.record_change`).
The version is raised by `version = version + 1 … RETURNING`, under the row lock of that very
UPDATE, so two transactions changing one row can never send two records with one version.

The snapshot reads (`tenant_copies`, `server_copies`) serve the internal copy routes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, event, inspect, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.orm import Mapper, Session, object_session
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry.models import RegistryChangesOutbox, SmtpServer, Tenant
from shared import outbox
from shared.db import table_of
from shared.pagination import encode_cursor
from shared.registry_changes import (
    Change,
    RegistryChange,
    ServerCopy,
    ServerCopyPage,
    TenantCopy,
    TenantCopyPage,
)

OUTBOX = table_of(RegistryChangesOutbox)
_servers = table_of(SmtpServer)
_tenants = table_of(Tenant)

# What the copies hold; a change of any other column (a password, the last poll) is not news.
SERVER_COPIED = ("tenant_id", "status", "daily_cap", "label", "host", "username", "provider")
TENANT_COPIED = ("name", "api_key_hash")

_SERVER_COLUMNS = (
    _servers.c.id,
    _servers.c.tenant_id,
    _servers.c.status,
    _servers.c.daily_cap,
    _servers.c.label,
    _servers.c.host,
    _servers.c.username,
    _servers.c.provider,
    _servers.c.imap_host.is_not(None).label("reads_mailbox"),
    _servers.c.version,
)
_TENANT_COLUMNS = (_tenants.c.id, _tenants.c.name, _tenants.c.api_key_hash, _tenants.c.version)


def _server_copy(row: Row[Any], *, deleted: bool = False) -> ServerCopy:
    return ServerCopy(
        id=row.id,
        tenant_id=row.tenant_id,
        status=str(row.status),
        daily_cap=row.daily_cap,
        label=row.label,
        host=row.host,
        username=row.username,
        provider=row.provider,
        reads_mailbox=bool(row.reads_mailbox),
        version=row.version,
        deleted=deleted,
    )


def _tenant_copy(row: Row[Any], *, deleted: bool = False) -> TenantCopy:
    return TenantCopy(
        id=row.id,
        name=row.name,
        api_key_hash=row.api_key_hash,
        version=row.version,
        deleted=deleted,
    )


def _write(connection: Connection, session: Session | None, change: RegistryChange) -> None:
    connection.execute(OUTBOX.insert(), outbox.rows([change]))
    if session is not None:
        outbox.mark_written(session, OUTBOX.name)


@dataclass(frozen=True)
class _Copied:
    """A model the copies hold: its table, the columns they copy, how a row becomes a record
    and a record a change."""

    table: Table
    columns: tuple[Any, ...]
    record: Callable[[Row[Any]], TenantCopy | ServerCopy]
    change: Callable[[Any, Change], RegistryChange]


_SERVER = _Copied(_servers, _SERVER_COLUMNS, _server_copy, RegistryChange.of_server)
_TENANT = _Copied(_tenants, _TENANT_COLUMNS, _tenant_copy, RegistryChange.of_tenant)


def _bump(
    connection: Connection, kind: _Copied, row_id: uuid.UUID
) -> TenantCopy | ServerCopy | None:
    # The row as it now is, read back by the statement that raises its version.
    table = kind.table
    row = connection.execute(
        update(table)
        .where(table.c.id == row_id)
        .values(version=table.c.version + 1)
        .returning(*kind.columns)
    ).first()
    return None if row is None else kind.record(row)


def _changed(target: object, columns: tuple[str, ...]) -> bool:
    state = inspect(target)
    return any(state.attrs[name].history.has_changes() for name in columns)


def _announce(
    connection: Connection, kind: _Copied, target: SmtpServer | Tenant, change: Change
) -> None:
    copy = _bump(connection, kind, target.id)
    if copy is None:
        return
    set_committed_value(target, "version", copy.version)
    if change == "deleted":
        copy = copy.model_copy(update={"deleted": True})
    _write(connection, object_session(target), kind.change(copy, change))


def _server_inserted(_mapper: Mapper[Any], connection: Connection, server: SmtpServer) -> None:
    _announce(connection, _SERVER, server, "created")


def _server_updated(_mapper: Mapper[Any], connection: Connection, server: SmtpServer) -> None:
    if _changed(server, SERVER_COPIED) or inspect(server).attrs.imap_host.history.has_changes():
        _announce(connection, _SERVER, server, "updated")


def _server_deleting(_mapper: Mapper[Any], connection: Connection, server: SmtpServer) -> None:
    # Before the DELETE: the row still answers RETURNING; the tombstone carries its last version
    # plus one, so an older record arriving late cannot bring the server back in a copy.
    _announce(connection, _SERVER, server, "deleted")


def _tenant_inserted(_mapper: Mapper[Any], connection: Connection, tenant: Tenant) -> None:
    _announce(connection, _TENANT, tenant, "created")


def _tenant_updated(_mapper: Mapper[Any], connection: Connection, tenant: Tenant) -> None:
    if _changed(tenant, TENANT_COPIED):
        _announce(connection, _TENANT, tenant, "updated")


def _tenant_deleting(_mapper: Mapper[Any], connection: Connection, tenant: Tenant) -> None:
    _announce(connection, _TENANT, tenant, "deleted")


_LISTENERS = (
    (SmtpServer, "after_insert", _server_inserted),
    (SmtpServer, "after_update", _server_updated),
    (SmtpServer, "before_delete", _server_deleting),
    (Tenant, "after_insert", _tenant_inserted),
    (Tenant, "after_update", _tenant_updated),
    (Tenant, "before_delete", _tenant_deleting),
)


def install() -> None:
    """Idempotent; called when a registry starts, not at import."""
    for model, name, listener in _LISTENERS:
        if not event.contains(model, name, listener):
            event.listen(model, name, listener)


async def server_changed(session: AsyncSession, server_id: uuid.UUID) -> None:
    """For a copied column changed by a Core statement, which the mapper events do not see."""

    def announce(sync: Session) -> None:
        connection = sync.connection()
        copy = _bump(connection, _SERVER, server_id)
        if copy is not None:
            _write(connection, sync, _SERVER.change(copy, "updated"))

    await session.run_sync(announce)


async def _rows(
    session: AsyncSession, kind: _Copied, after: uuid.UUID | None, limit: int, *where: Any
) -> list[TenantCopy | ServerCopy]:
    """A page of `kind`'s records in id order, after `after`, narrowed by `where`."""
    table = kind.table
    query = select(*kind.columns).where(*where).order_by(table.c.id).limit(limit)
    if after is not None:
        query = query.where(table.c.id > after)
    rows = (await session.exec(query)).all()  # type: ignore[call-overload]
    return [kind.record(row) for row in rows]


async def tenant_copies(
    session: AsyncSession, *, after: uuid.UUID | None, limit: int, key_digest: str | None = None
) -> TenantCopyPage:
    where = [] if key_digest is None else [_tenants.c.api_key_hash == key_digest]
    items = await _rows(session, _TENANT, after, limit, *where)
    return TenantCopyPage.model_validate({"items": items, "next_cursor": _next(items, limit)})


async def server_copies(
    session: AsyncSession,
    *,
    after: uuid.UUID | None,
    limit: int,
    tenant_id: uuid.UUID | None = None,
) -> ServerCopyPage:
    where = [] if tenant_id is None else [_servers.c.tenant_id == tenant_id]
    items = await _rows(session, _SERVER, after, limit, *where)
    return ServerCopyPage.model_validate({"items": items, "next_cursor": _next(items, limit)})


def _next(items: list[TenantCopy | ServerCopy], limit: int) -> str | None:
    return encode_cursor(items[-1].id) if len(items) == limit else None
