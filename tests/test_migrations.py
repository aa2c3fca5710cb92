"""Alembic migrations: each service's history runs up and down on SQLite and PostgreSQL, alone,
touches its own tables only, and matches its models; a database of the shared history before
the split is handed over without losing a row."""

from __future__ import annotations

import ast
import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, column, inspect, select, table, text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from shared.db import create_engine
from shared.migrate import (
    HISTORIES,
    LEGACY,
    LEGACY_HEAD,
    LEGACY_VERSION_TABLE,
    History,
    alembic_config,
    downgrade_database,
    history_config,
    own_tables_only,
    owned_metadata,
    upgrade_database,
)


def _on(url: str, work: Callable[[Connection], Any]) -> Any:
    async def go() -> Any:
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                return await connection.run_sync(work)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _version_tables() -> set[str]:
    return {history.version_table for history in HISTORIES}


def _schema_diff(url: str, metadata: MetaData) -> tuple[list[object], set[str]]:
    def diff(connection: Connection) -> tuple[list[object], set[str]]:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "include_object": own_tables_only(metadata)},
        )
        tables = set(inspect(connection).get_table_names()) - _version_tables()
        return compare_metadata(context, metadata), tables

    result: tuple[list[object], set[str]] = _on(url, diff)
    return result


@pytest.fixture
def empty_url(database_url: str) -> Iterator[str]:
    """The kind of database `database_url` is, with nothing in it; migrated again after the
    test (the PostgreSQL one is the session's, shared with later tests)."""
    downgrade_database(database_url)
    assert _schema_diff(database_url, MetaData())[1] == set()
    yield database_url
    upgrade_database(database_url)


def test_migrations_match_models_and_downgrade_cleanly(database_url: str) -> None:
    # database_url is already at head.
    differences, tables = _schema_diff(database_url, SQLModel.metadata)
    assert {"tenants", "smtp_servers", "emails", "webhook_endpoints"} <= tables
    assert differences == []
    downgrade_database(database_url)
    assert _schema_diff(database_url, SQLModel.metadata)[1] == set()
    upgrade_database(database_url)
    differences, _ = _schema_diff(database_url, SQLModel.metadata)
    assert differences == []


def test_every_table_belongs_to_exactly_one_service() -> None:
    owners: dict[str, list[str]] = {}
    for history in HISTORIES:
        for name in owned_metadata(history.package).tables:
            owners.setdefault(name, []).append(history.service)
    assert set(owners) == set(SQLModel.metadata.tables)
    assert {name: found for name, found in owners.items() if len(found) != 1} == {}


@pytest.mark.parametrize("history", HISTORIES, ids=lambda history: history.service)
def test_each_history_runs_alone_on_its_own_tables(history: History, empty_url: str) -> None:
    """Upgraded alone on an empty database, a service's history creates exactly its tables (so
    it neither needs nor touches another's: an ALTER of a missing table fails), matches its
    models, and goes down to nothing."""
    owned = owned_metadata(history.package)
    command.upgrade(history_config(history, empty_url), "head")
    differences, tables = _schema_diff(empty_url, owned)
    assert tables == set(owned.tables)
    assert differences == []
    command.downgrade(history_config(history, empty_url), "base")
    assert _schema_diff(empty_url, owned)[1] == set()


_TABLE_OPS = {
    "create_table",
    "drop_table",
    "batch_alter_table",
    "add_column",
    "drop_column",
    "alter_column",
    "rename_table",
    "bulk_insert",
}


def _named_tables(path: Path) -> set[str]:
    """The tables a migration names in `op.<table operation>(...)` and `op.create_index(name,
    table, ...)` calls."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "op"):
            continue
        position = 1 if node.func.attr in {"create_index", "drop_index"} else 0
        if node.func.attr in _TABLE_OPS or position:
            arguments = [*node.args, *(k.value for k in node.keywords if k.arg == "table_name")]
            named = arguments[position] if len(arguments) > position else None
            if isinstance(named, ast.Constant):
                found.add(str(named.value))
    return found


@pytest.mark.parametrize("history", HISTORIES, ids=lambda history: history.service)
def test_no_migration_of_a_service_names_another_services_table(history: History) -> None:
    others = set(SQLModel.metadata.tables) - set(owned_metadata(history.package).tables)
    for path in sorted((history.location / "versions").glob("*.py")):
        assert _named_tables(path) & others == set(), path.name


def test_the_ownership_check_sees_a_foreign_table(tmp_path: Path) -> None:
    migration = tmp_path / "0002_x.py"
    migration.write_text(
        "def upgrade():\n"
        "    with op.batch_alter_table('smtp_servers') as batch:\n        pass\n"
        "    op.create_index('ix', 'emails', ['id'])\n"
    )
    assert _named_tables(migration) == {"smtp_servers", "emails"}


def test_a_database_of_the_shared_history_is_handed_over(empty_url: str) -> None:
    """A database created before the split (one `alembic_version` at the shared history's end)
    is handed over to the services' histories: rows kept, schema at head, and a second run
    changes nothing."""
    command.upgrade(alembic_config(empty_url, LEGACY), LEGACY_HEAD)
    tenant_id = uuid.uuid4()
    _on(
        empty_url,
        lambda c: c.execute(
            text(
                "INSERT INTO tenants (id, name, api_key_hash, api_key_prefix, created_at) "
                "VALUES (:id, 'Acme', :digest, 'abl_x', CURRENT_TIMESTAMP)"
            ),
            {"id": tenant_id if "postgresql" in empty_url else tenant_id.hex, "digest": "d" * 64},
        ),
    )

    upgrade_database(empty_url)
    upgrade_database(empty_url)

    def state(connection: Connection) -> tuple[set[str], dict[str, str], int]:
        tables = set(inspect(connection).get_table_names())
        versions = {
            name: str(
                connection.execute(
                    select(column("version_num")).select_from(table(name))
                ).scalar_one()
            )
            for name in _version_tables()
        }
        tenants = connection.execute(text("SELECT count(*) FROM tenants")).scalar_one()
        return tables, versions, int(tenants)

    tables, versions, tenants = _on(empty_url, state)
    assert LEGACY_VERSION_TABLE not in tables
    heads = {
        history.version_table: ScriptDirectory.from_config(
            history_config(history, empty_url)
        ).get_current_head()
        for history in HISTORIES
    }
    assert versions == heads
    assert tenants == 1
    assert _schema_diff(empty_url, SQLModel.metadata)[0] == []
