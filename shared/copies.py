"""Keeping a copy of the registry's records in a service's own tables
(`shared/registry_changes.py` says what travels and why).

- `CopyRecord` / `TenantCopyRecord`: the columns of a copy table; each service subclasses them
  with `table=True` in its own models (`shared/` defines no service's table).
- `apply_newer`: one INSERT … ON CONFLICT (id) DO UPDATE … WHERE the stored version is older,
  so a replay, a duplicate or an older record arriving late changes nothing.
- `resync`: read every page of a snapshot route and apply it; a row of the copy that the registry
  no longer lists, and that no change touched since the reading began, becomes a tombstone.
- `TenantCopies`: a service's copy of the tenants: applies changes, authenticates API keys,
  and asks the registry for a key it has not heard of yet (a tenant created a moment ago),
  remembering for a while the keys the registry does not know either.
- `HttpRegistrySource`: the snapshot routes over HTTP, for the stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

import httpx
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import Table, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import Field, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.app import add_readiness_check, background_loops
from shared.broker import Delivery
from shared.db import patient_handler
from shared.errors import PermanentMessageError
from shared.internal_client import get_model
from shared.metrics import COPY_READS, REGISTRY_CHANGES_APPLIED
from shared.registry_changes import (
    COPY_PAGE_MAX,
    CopyUnavailable,
    RegistryChange,
    RegistrySource,
    ServerCopyPage,
    TenantCopy,
    TenantCopyPage,
)
from shared.settings import InternalTokenSettings, UpstreamSettings
from shared.tenancy import AuthenticatedTenant, add_tenant_lookup
from shared.timeutil import UtcDateTime, utcnow

logger = logging.getLogger("abl.copies")

# How long a key the registry did not know is answered "unknown" without asking it again: a
# client trying keys at random costs the registry at most one lookup per key and period.
UNKNOWN_KEY_SECONDS = 5.0
UNKNOWN_KEYS_KEPT = 10_000
# And at most this many keys a second are asked of the registry at all, whoever sends them: a
# flood of made-up keys is answered 401 from the copy alone (a tenant made within that second
# is known a moment later, when its change arrives).
KEY_LOOKUPS_PER_SECOND = 50
# How soon an empty copy asks the registry again when it could not answer.
RETRY_SECONDS = 5.0
CHANGES_PREFETCH = 64
HTTP_TIMEOUT_SECONDS = 10.0


class CopyRecord(SQLModel):
    """The columns every copy table has besides the record's own."""

    id: uuid.UUID = Field(primary_key=True)
    version: int = Field(default=0)
    # A tombstone: the registry deleted the row; kept so that an older record cannot revive it.
    deleted: bool = Field(default=False)
    copied_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class TenantCopyRecord(CopyRecord):
    name: str = Field(max_length=200)
    api_key_hash: str = Field(max_length=64, index=True)


class CopyStateRecord(SQLModel):
    """One row: when the copy last held a whole snapshot of the registry. A copy is ready once
    it has read one in this process, or, while the registry cannot answer, once one was read
    before (it goes on taking changes from the bus meanwhile)."""

    id: int = Field(default=1, primary_key=True)
    snapshot_at: datetime = Field(sa_type=UtcDateTime)


def _insert(session: AsyncSession) -> Any:
    return postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


async def apply_newer(session: AsyncSession, table: Table, records: Sequence[BaseModel]) -> int:
    """Insert or update `records` where they are newer than the copy; how many changed it."""
    if not records:
        return 0
    now = utcnow()
    columns = {c.name for c in table.columns}
    newest = {r.id: r for r in sorted(records, key=_version)}  # type: ignore[attr-defined]
    # In id order: two transactions upserting overlapping rows lock them in the same order.
    rows = [
        {**newest[row_id].model_dump(include=columns), "copied_at": now}
        for row_id in sorted(newest)
    ]
    # One multi-row statement with RETURNING: its rows are what changed (an executemany's
    # rowcount is -1 on asyncpg). A page is at most 1,000 rows, within both databases' limits
    # on bound parameters.
    statement = _insert(session)(table).values(rows)
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={name: statement.excluded[name] for name in columns if name != "id"},
        where=or_(
            table.c.version < statement.excluded.version,
            # A tombstone a resync made keeps the row's last version: the registry listing the
            # row again at that version (it was not deleted after all: a clock between replicas
            # made it look so) brings it back. A real delete's tombstone carries a version one
            # past the row's last, which no live record has.
            and_(
                table.c.deleted.is_(True),
                statement.excluded.deleted.is_(False),
                table.c.version == statement.excluded.version,
            ),
        ),
    ).returning(table.c.id)
    result = await session.exec(statement)
    return len(result.all())


def _version(record: BaseModel) -> int:
    version: int = record.version  # type: ignore[attr-defined]
    return version


Page = TenantCopyPage | ServerCopyPage


async def resync(
    sessions: async_sessionmaker[AsyncSession],
    table: Table,
    read: Callable[[str | None], Awaitable[Page]],
    *,
    scope: Any = None,
) -> int:
    """Apply every page `read(cursor)` gives; then the copy's rows in `scope` (a WHERE clause,
    all rows by default) that were not listed and were copied before the reading began become
    tombstones. How many rows changed."""
    started = utcnow()
    seen: set[uuid.UUID] = set()
    changed = 0
    cursor: str | None = None
    while True:
        page = await read(cursor)
        seen.update(item.id for item in page.items)
        async with sessions() as session, session.begin():
            changed += await apply_newer(session, table, page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    async with sessions() as session, session.begin():
        query = select(table.c.id).where(table.c.deleted.is_(False), table.c.copied_at < started)
        if scope is not None:
            query = query.where(scope)
        rows = (await session.exec(query)).all()  # type: ignore[call-overload]
        gone = [row_id for (row_id,) in rows if row_id not in seen]
        for start in range(0, len(gone), 500):
            await session.exec(
                update(table)
                .where(table.c.id.in_(gone[start : start + 500]))
                .values(deleted=True, copied_at=utcnow())
            )
        changed += len(gone)
    return changed


async def is_empty(sessions: async_sessionmaker[AsyncSession], table: Table) -> bool:
    async with sessions() as session:
        query = select(func.count()).select_from(table)
        (count,) = (await session.exec(query)).one()  # type: ignore[call-overload]
    return int(count) == 0


class TenantCopies:
    """A service's copy of the registry's tenants, in its own `table`."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        table: Table,
        source: RegistrySource,
        *,
        service: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions = sessions
        self.table = table
        self.source = source
        self.service = service
        self.clock = clock
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._asked_at: deque[float] = deque()

    async def apply(self, session: AsyncSession, records: Sequence[TenantCopy]) -> int:
        for record in records:
            self._unknown.pop(record.api_key_hash, None)
        return await apply_newer(session, self.table, records)

    async def _find(self, digest: str) -> AuthenticatedTenant | None:
        table = self.table
        async with self.sessions() as session:
            query = select(table.c.id, table.c.name).where(
                table.c.api_key_hash == digest, table.c.deleted.is_(False)
            )
            row = (await session.exec(query)).first()  # type: ignore[call-overload]
        return None if row is None else AuthenticatedTenant(id=row[0], name=row[1])

    async def authenticate(self, digest: str) -> AuthenticatedTenant | None:
        found = await self._find(digest)
        if found is not None:
            return found
        now = self.clock()
        asked = self._unknown.get(digest)
        if asked is not None and now - asked < UNKNOWN_KEY_SECONDS:
            return None
        while self._asked_at and now - self._asked_at[0] >= 1.0:
            self._asked_at.popleft()
        if len(self._asked_at) >= KEY_LOOKUPS_PER_SECOND:
            COPY_READS.labels(self.service, "key", "limited").inc()
            return None
        self._asked_at.append(now)
        try:
            page = await self.source.tenants(cursor=None, limit=1, key_digest=digest)
        except CopyUnavailable as exc:
            COPY_READS.labels(self.service, "key", "failed").inc()
            logger.warning("an API key not in the copy; the registry cannot be asked: %s", exc)
            return None
        COPY_READS.labels(self.service, "key", "found" if page.items else "unknown").inc()
        if not page.items:
            self._unknown[digest] = now
            self._unknown.move_to_end(digest)
            while len(self._unknown) > UNKNOWN_KEYS_KEPT:
                self._unknown.popitem(last=False)
            return None
        async with self.sessions() as session, session.begin():
            await self.apply(session, page.items)
        return await self._find(digest)

    async def resync(self) -> int:
        return await resync(
            self.sessions,
            self.table,
            lambda cursor: self.source.tenants(cursor=cursor, limit=COPY_PAGE_MAX),
        )


class CopyKeeper:
    """A service's copy of the registry: its tenants here; a subclass adds what else it keeps
    (the scheduler's servers). The consumer of the service's changes queue, the `TenantLookup`
    of its routes, and the loop that rebuilds an empty copy and heals any copy now and then."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        source: RegistrySource,
        tenant_table: Table,
        state_table: Table,
        *,
        service: str,
        resync_seconds: float = 600.0,
    ) -> None:
        self.state_table = state_table
        self.sessions = sessions
        self.source = source
        self.service = service
        self.resync_seconds = resync_seconds
        self.tenants = TenantCopies(sessions, tenant_table, source, service=service)
        # Set once the copy holds a whole snapshot (or was found holding one at start).
        self.ready = asyncio.Event()

    @property
    def tables(self) -> tuple[Table, ...]:
        return (self.tenants.table,)

    async def authenticate(self, digest: str) -> AuthenticatedTenant | None:
        return await self.tenants.authenticate(digest)

    async def handle(self, delivery: Delivery) -> None:
        try:
            change = RegistryChange.decode(delivery.body)
        except ValueError as exc:
            raise PermanentMessageError("not a registry change") from exc
        async with self.sessions() as session, session.begin():
            changed = await self.apply(session, change)
        REGISTRY_CHANGES_APPLIED.labels(self.service, "applied" if changed else "stale").inc()

    async def apply(self, session: AsyncSession, change: RegistryChange) -> int:
        """How many rows of the copy `change` changed (0: it was not newer)."""
        if change.tenant is None:
            return 0
        return await self.tenants.apply(session, [change.tenant])

    async def resync(self) -> int:
        """Read the whole snapshot; how many rows of the copy it changed."""
        kind = "resync" if self.ready.is_set() else "rebuild"
        try:
            changed = await self.read_all()
        except Exception:
            COPY_READS.labels(self.service, kind, "failed").inc()
            raise
        COPY_READS.labels(self.service, kind, "ok").inc()
        async with self.sessions() as session, session.begin():
            statement = _insert(session)(self.state_table).values(id=1, snapshot_at=utcnow())
            await session.exec(
                statement.on_conflict_do_update(
                    index_elements=["id"], set_={"snapshot_at": statement.excluded.snapshot_at}
                )
            )
        self.ready.set()
        return changed

    async def read_all(self) -> int:
        return await self.tenants.resync()

    async def run(self, stop: asyncio.Event) -> None:
        """The whole snapshot is read at start (ready once it is), then every `resync_seconds`.
        While the database or the registry cannot answer it is tried again every few seconds;
        meanwhile a copy that held a whole snapshot before is ready (changes keep arriving by
        the bus), one that never did is not."""
        delay = 0.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            delay = self.resync_seconds
            try:
                changed = await self.resync()
            except Exception as exc:
                # Our own message, or only the kind of a database error (whose text may quote
                # the statement's values).
                why = str(exc) if isinstance(exc, CopyUnavailable) else type(exc).__name__
                logger.warning("copy of the registry not read: %s", why)
                delay = min(delay, RETRY_SECONDS)
                if not self.ready.is_set() and await self._held_a_snapshot():
                    logger.warning("copy of the registry: serving the last whole snapshot")
                    self.ready.set()
                continue
            if changed:
                logger.info("copy of the registry: %d rows brought up to date", changed)

    async def _held_a_snapshot(self) -> bool:
        try:
            return not await is_empty(self.sessions, self.state_table)
        except Exception:
            return False


SourceFactory = Callable[[FastAPI], AbstractAsyncContextManager[RegistrySource]]


class CopySettings(Protocol):
    """What `copy_resource` reads of a service's settings (the scheduler's, the webhooks')."""

    copy_resync_seconds: float
    dependency_wait_seconds: float

    def registry_changes_queue(self, service: str) -> str: ...


def copy_resource(
    settings: CopySettings,
    service: str,
    keeper: Callable[[async_sessionmaker[AsyncSession], RegistrySource], CopyKeeper],
    source: SourceFactory,
    *,
    run_loop: bool = True,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The copy `service` keeps, for the life of its app: `app.state.copies[service]`, the
    tenant lookup of its routes, the consumer of its changes queue (readiness waits for it and
    for a whole copy) and the resync loop. Needs `app.state.sessions` and `app.state.bus`."""

    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        async with source(app) as opened:
            kept = keeper(app.state.sessions, opened)
            copies: dict[str, CopyKeeper] = getattr(app.state, "copies", {})
            copies[service] = kept
            app.state.copies = copies
            add_tenant_lookup(app, service, kept)
            bus = app.state.bus
            queue = settings.registry_changes_queue(service)
            await bus.consume(
                queue,
                patient_handler(kept.handle, settings.dependency_wait_seconds, f"{service} copy"),
                prefetch=CHANGES_PREFETCH,
            )

            async def copy_ready() -> bool:
                return bool(bus.consuming(queue)) and kept.ready.is_set()

            add_readiness_check(app, copy_ready)
            if not run_loop:
                kept.ready.set()  # no rebuild will come: the copy is filled on demand only
            async with background_loops(*([kept.run] if run_loop else [])):
                yield

    return resource


@asynccontextmanager
async def registry_source_over_http(app: FastAPI) -> AsyncIterator[RegistrySource]:
    """The stack's source: the registry's snapshot routes (`ABL_REGISTRY_URL`)."""
    settings = app.state.settings
    assert isinstance(settings, UpstreamSettings)
    assert isinstance(settings, InternalTokenSettings)
    async with httpx.AsyncClient(
        base_url=settings.registry_url, timeout=HTTP_TIMEOUT_SECONDS
    ) as client:
        yield HttpRegistrySource(client, settings.internal_token.get_secret_value())


class HttpRegistrySource:
    """The registry's snapshot routes (`/internal/v1/copies/…`), with the internal token."""

    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}

    async def _page(self, path: str, model: type[Page], params: dict[str, Any]) -> Page:
        query = httpx.QueryParams({k: str(v) for k, v in params.items() if v is not None})
        page = await get_model(
            self.client,
            f"{path}?{query}",
            model,
            headers=self.headers,
            unavailable=CopyUnavailable,
        )
        if page is None:
            raise CopyUnavailable(f"registry has no {path}")
        return page

    async def tenants(
        self, *, cursor: str | None, limit: int, key_digest: str | None = None
    ) -> TenantCopyPage:
        params = {"cursor": cursor, "limit": limit, "key_digest": key_digest}
        page = await self._page("/internal/v1/copies/tenants", TenantCopyPage, params)
        assert isinstance(page, TenantCopyPage)
        return page

    async def servers(
        self, *, cursor: str | None, limit: int, tenant_id: uuid.UUID | None = None
    ) -> ServerCopyPage:
        params = {"cursor": cursor, "limit": limit, "tenant_id": tenant_id}
        page = await self._page("/internal/v1/copies/servers", ServerCopyPage, params)
        assert isinstance(page, ServerCopyPage)
        return page
