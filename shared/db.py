"""Database engine and sessions: SQLite by default, PostgreSQL in production.

The engine is made in a service's lifespan and disposed there; nothing connects at import time.
The `SessionDep` dependency owns the transaction: it commits when the request handler returns
and rolls back when it raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Table, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
SYNC_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}


def async_url(url: str) -> URL:
    """Turn `postgresql://…` or `sqlite:///…` into the URL of its asyncio driver."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    if backend not in ASYNC_DRIVERS:
        raise ValueError(f"unsupported database {backend!r}: use sqlite or postgresql")
    return parsed.set(drivername=ASYNC_DRIVERS[backend])


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the one writer; busy_timeout makes concurrent writers
    # wait for the lock instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL loses no committed transaction on a process crash (only, at worst,
    # the last ones on a power loss) and saves an fsync per commit.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    target = async_url(url)
    if target.get_backend_name() == "sqlite":
        engine = create_async_engine(target, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    return create_async_engine(target, **kwargs)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessions
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


# scope="function" commits before the response is sent, so a 2xx always means stored.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def upsert_increment(
    session: AsyncSession,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    keys: tuple[str, ...],
    column: str,
) -> Any:
    """INSERT rows … ON CONFLICT (keys) DO UPDATE column = column + the row's value."""
    insert = postgresql_insert if is_postgres(session) else sqlite_insert
    statement = insert(table).values(rows)
    return statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={column: getattr(table.c, column) + statement.excluded[column]},
    )


def insert_ignore(
    session: AsyncSession, table: Table, rows: dict[str, Any] | list[dict[str, Any]]
) -> Any:
    """INSERT … ON CONFLICT DO NOTHING, on SQLite and PostgreSQL."""
    insert = postgresql_insert if is_postgres(session) else sqlite_insert
    return insert(table).values(rows).on_conflict_do_nothing()


def table_of(model: type[SQLModel]) -> Table:
    """The Core table of a SQLModel table class, for bulk and guarded statements."""
    table: Table = getattr(model, "__table__")  # noqa: B009 - SQLModel does not type it
    return table
