"""Database engine and sessions: SQLite by default, PostgreSQL in production.

The engine is made in a service's lifespan and disposed there; nothing connects at import time.
The `SessionDep` dependency owns the transaction: it commits when the request handler returns
and rolls back when it raises.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request
from sqlalchemy import ColumnElement, Executable, Table, any_, bindparam, column, event, func
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.types import TypeEngine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.backoff import GaveUp, patiently
from shared.broker import Delivery
from shared.errors import TransientMessageError

logger = logging.getLogger("abl.db")

T = TypeVar("T")

# A pooled connection older than this is closed and opened again before use: it outlives no
# idle timeout of a proxy, a firewall or a failover, without a round trip at every checkout.
POOL_RECYCLE_SECONDS = 1800

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
    # JSON columns (an email's headers) are read on every dispatch: orjson parses them ~4x
    # faster than the standard library, into the same values.
    kwargs.setdefault("json_deserializer", orjson.loads)
    if target.get_backend_name() == "sqlite":
        engine = create_async_engine(target, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it costs a BEGIN/SELECT/ROLLBACK round trip at every checkout, on every
    # email. A connection the server dropped fails its first statement instead; SQLAlchemy then
    # invalidates the whole pool, and `in_transaction` runs the hot paths' work again.
    kwargs.setdefault("pool_recycle", POOL_RECYCLE_SECONDS)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    return create_async_engine(target, **kwargs)


def is_disconnect(exc: BaseException) -> bool:
    """The database connection was lost (server restart, failover, proxy timeout)."""
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


async def in_transaction(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = 3,
) -> T:
    """Run `work` in one transaction, again on a fresh connection when the connection died.

    A transaction whose connection was lost did not commit, except when the line died during
    COMMIT itself; `work` must therefore be safe to repeat, as every hot path here is (its
    statements are guarded by the state they change).
    """
    for attempt in range(1, attempts + 1):
        try:
            async with sessions() as session, session.begin():
                return await work(session)
        except DBAPIError as exc:
            if not is_disconnect(exc) or attempt == attempts:
                raise
            logger.warning("database connection lost; running the transaction again")
    raise AssertionError("unreachable")  # the loop returns or raises


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


async def upsert_increment(
    session: AsyncSession,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    keys: tuple[str, ...],
    column: str,
) -> None:
    """INSERT rows … ON CONFLICT (keys) DO UPDATE column = column + the row's value.

    The rows go as executemany parameters, not in the statement, so its compiled form is
    cached; SQLAlchemy still sends them as one multi-row INSERT.
    """
    insert = postgresql_insert if is_postgres(session) else sqlite_insert
    statement = insert(table)
    statement = statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={column: getattr(table.c, column) + statement.excluded[column]},
    )
    connection = await session.connection()
    await connection.execute(statement, rows)


async def insert_ignore(session: AsyncSession, table: Table, rows: list[dict[str, Any]]) -> None:
    """INSERT … ON CONFLICT DO NOTHING, on SQLite and PostgreSQL (cached, as above)."""
    insert = postgresql_insert if is_postgres(session) else sqlite_insert
    connection = await session.connection()
    await connection.execute(insert(table).on_conflict_do_nothing(), rows)


def insert_ignore_statement(
    session: AsyncSession, table: Table, rows: dict[str, Any] | list[dict[str, Any]]
) -> Any:
    """The same INSERT … ON CONFLICT DO NOTHING as a statement, for callers that need its
    rowcount (how many rows were new)."""
    insert = postgresql_insert if is_postgres(session) else sqlite_insert
    return insert(table).values(rows).on_conflict_do_nothing()


def table_of(model: type[SQLModel]) -> Table:
    """The Core table of a SQLModel table class, for bulk and guarded statements."""
    table: Table = getattr(model, "__table__")  # noqa: B009 - SQLModel does not type it
    return table


def among(
    session: AsyncSession, target: Any, values: Sequence[Any], type_: TypeEngine[Any]
) -> ColumnElement[bool]:
    """`target IN values`, as `target = ANY($1)` with one array parameter on PostgreSQL.

    An IN list is one parameter per value: a thousand servers make a statement of a thousand
    parameters whose text (and prepared statement) changes with their count. The array keeps
    one statement, prepared once.
    """
    if is_postgres(session):
        return target == any_(bindparam(None, list(values), type_=postgresql.ARRAY(type_)))  # type: ignore[no-any-return]
    return target.in_(values)  # type: ignore[no-any-return]


class RowSet:
    """Many rows of values for one set-based statement, on either database.

    PostgreSQL: the rows travel as one array per column and are read back with `unnest(...) AS
    v(...)`, so a statement such as `UPDATE t SET ... FROM v WHERE t.id = v.id RETURNING ...`
    touches every row in one round trip, with three parameters however many rows there are
    (a VALUES list would need one per value, and asyncpg allows 32,767). SQLite: the same
    statement is run once per row with `executemany`, which the sqlite3 module loops in C.
    Build the statement with `rows.c["name"]` wherever a row's value goes.
    """

    def __init__(
        self,
        session: AsyncSession,
        columns: dict[str, TypeEngine[Any]],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        self.postgres = is_postgres(session)
        self.size = len(rows)
        names = list(columns)
        if self.postgres:
            # One comprehension per column: zip(*rows) over 20,000 rows is ~8x slower.
            arrays = [[row[i] for row in rows] for i in range(len(names))]
            source = (
                func.unnest(
                    *(
                        bindparam(f"v_{name}", array, type_=postgresql.ARRAY(columns[name]))
                        for name, array in zip(names, arrays, strict=True)
                    )
                )
                .table_valued(*(column(name, columns[name]) for name in names))
                .render_derived(name="v")
            )
            # The rows as a FROM item, for a join (LATERAL, say) that needs them as a table.
            self.source: Any = source
            self.c: dict[str, Any] = {name: source.c[name] for name in names}
            self.params: list[dict[str, Any]] = []
        else:
            self.source = None
            self.c = {name: bindparam(f"v_{name}", type_=columns[name]) for name in names}
            self.params = [
                {f"v_{name}": value for name, value in zip(names, row, strict=True)} for row in rows
            ]

    async def execute(self, session: AsyncSession, statement: Executable) -> Any:
        """Run `statement` over every row (nothing when there are none)."""
        if not self.size:
            return None
        connection = await session.connection()
        if self.postgres:
            return await connection.execute(statement)
        return await connection.execute(statement, self.params)


def patient_handler(
    handler: Callable[[Delivery], Awaitable[None]], wait_seconds: float, what: str
) -> Callable[[Delivery], Awaitable[None]]:
    """A consumer's `handler`, waiting for the database with backoff instead of returning the
    message to its queue at once (a database outage must not burn its delivery limit); past
    `wait_seconds` (a service's `dependency_wait_seconds`) the message goes back."""

    async def handle(delivery: Delivery) -> None:
        try:
            await patiently(
                lambda: handler(delivery),
                retry_on=(DBAPIError, OSError),
                limit_seconds=wait_seconds,
                what=f"database ({what})",
                logger=logger,
            )
        except GaveUp as exc:
            raise TransientMessageError(str(exc)) from exc

    return handle
