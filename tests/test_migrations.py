"""Alembic migrations run up and down on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

from shared.db import create_engine
from shared.migrate import downgrade_database, upgrade_database


async def _schema_diff(url: str) -> tuple[list[object], set[str]]:
    engine = create_engine(url)

    def diff(connection: object) -> tuple[list[object], set[str]]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})  # type: ignore[arg-type]
        return compare_metadata(context, SQLModel.metadata), set(
            inspect(connection).get_table_names()
        )

    async with engine.connect() as connection:
        result = await connection.run_sync(diff)
    await engine.dispose()
    return result


def test_migrations_match_models_and_downgrade_cleanly(database_url: str) -> None:
    # database_url is already at head.
    differences, tables = asyncio.run(_schema_diff(database_url))
    assert {"tenants", "smtp_servers"} <= tables
    assert differences == []
    downgrade_database(database_url, "base")
    _, tables = asyncio.run(_schema_diff(database_url))
    assert not {"tenants", "smtp_servers"} & tables
    upgrade_database(database_url)
    differences, _ = asyncio.run(_schema_diff(database_url))
    assert differences == []
