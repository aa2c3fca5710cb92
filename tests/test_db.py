"""Pooled PostgreSQL connections: no round trip before each use, and a dropped connection is
survived by the transactions that are run through `in_transaction`."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.db import create_engine, in_transaction, session_factory

pytestmark = pytest.mark.postgres


async def pooled_backend(engine: AsyncEngine) -> int:
    """Open the pool's one connection and return its server process id."""
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def terminate(url: str, pid: int) -> None:
    admin = await asyncpg.connect(url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_a_checkout_sends_nothing_before_the_work(migrated_postgres: str) -> None:
    # With a pre-ping the dead connection would be noticed and replaced at checkout; without
    # one, the first statement meets the dead connection: one round trip fewer per use.
    engine = create_engine(migrated_postgres, pool_size=1, max_overflow=0)
    try:
        await terminate(migrated_postgres, await pooled_backend(engine))
        async with session_factory(engine)() as session:
            with pytest.raises(DBAPIError) as caught:
                await session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        assert caught.value.connection_invalidated
    finally:
        await engine.dispose()


async def test_a_transaction_runs_again_after_its_connection_was_dropped(
    migrated_postgres: str,
) -> None:
    engine = create_engine(migrated_postgres, pool_size=1, max_overflow=0)
    calls: list[int] = []

    async def work(session: AsyncSession) -> int:
        pid = (await session.exec(text("SELECT pg_backend_pid()"))).scalar_one()  # type: ignore[call-overload]
        calls.append(int(pid))
        return int(pid)

    try:
        dropped = await pooled_backend(engine)
        await terminate(migrated_postgres, dropped)
        pid = await in_transaction(session_factory(engine), work)
        assert pid != dropped
        assert calls == [pid]  # the first try failed at its first statement, on the dead line
    finally:
        await engine.dispose()


async def test_other_database_errors_are_not_retried(migrated_postgres: str) -> None:
    engine = create_engine(migrated_postgres)
    calls = 0

    async def work(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.exec(text("SELECT * FROM no_such_table"))  # type: ignore[call-overload]

    try:
        with pytest.raises(DBAPIError):
            await in_transaction(session_factory(engine), work)
        assert calls == 1
    finally:
        await engine.dispose()
