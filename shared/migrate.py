"""Run the Alembic migrations from code: `make run`, the migration Job and the tests use it.

Each service owns its tables and their history: `services/<service>/migrations/`, with a version
table of its own (`alembic_version_<service>`), so one service's migration never needs, or
touches, another's. They run in `HISTORIES` order; none depends on another (no foreign key
crosses services).

Databases created before the split carry one shared history (`alembic_version`,
`services/legacy_migrations/`, frozen at its last revision): the first upgrade brings that to its
end, stamps each service's history at its baseline (which creates exactly the tables that end
left) and drops the old version table. Every step of that hand-over can run again after a crash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, func, inspect, select, table, text
from sqlalchemy.engine import Connection, make_url

logger = logging.getLogger("abl.migrate")
SERVICES = Path(__file__).resolve().parent.parent / "services"
LEGACY = SERVICES / "legacy_migrations"
LEGACY_VERSION_TABLE = "alembic_version"
LEGACY_HEAD = "0013"


@dataclass(frozen=True)
class History:
    service: str
    # The revision that creates the tables the shared history left at LEGACY_HEAD.
    baseline: str

    @property
    def location(self) -> Path:
        return SERVICES / self.service / "migrations"

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.service}"

    @property
    def package(self) -> str:
        return f"services.{self.service}"


HISTORIES = (
    History("registry", baseline="registry_0001"),
    History("scheduler", baseline="scheduler_0001"),
    History("webhooks", baseline="webhooks_0001"),
)


def owned_metadata(package: str) -> MetaData:
    """The tables whose SQLModel classes live in `package`: a service's own schema."""
    import importlib

    from sqlmodel import SQLModel

    importlib.import_module(f"{package}.models")
    owned = MetaData()
    for mapper in SQLModel._sa_registry.mappers:
        table = mapper.local_table
        if mapper.class_.__module__.startswith(package + ".") and table is not None:
            table.to_metadata(owned)  # type: ignore[attr-defined]
    return owned


def own_tables_only(metadata: MetaData) -> Callable[..., bool]:
    """Alembic's `include_object`: leave other services' tables alone (in a shared database an
    autogenerate would otherwise offer to drop them)."""

    def include(_object: Any, name: str | None, type_: str, reflected: bool, _: Any) -> bool:
        return not (type_ == "table" and reflected and name not in metadata.tables)

    return include


def run_environment(service: str) -> None:
    """The body of every service's `env.py`: migrate the database named by the config (or
    ABL_DATABASE_URL) with that service's tables and version table."""
    from alembic import context

    history = next(h for h in HISTORIES if h.service == service)
    metadata = owned_metadata(history.package)
    options: dict[str, Any] = {
        "target_metadata": metadata,
        "version_table": history.version_table,
        "include_object": own_tables_only(metadata),
        "render_as_batch": True,  # SQLite alters tables by copying them
        "compare_type": True,
    }
    config = context.config
    url = str(
        context.get_x_argument(as_dictionary=True).get("url")
        or config.attributes.get("url")
        or os.environ.get("ABL_DATABASE_URL", "sqlite:///./abl.db")
    )
    if context.is_offline_mode():
        context.configure(url=url, literal_binds=True, **options)
        with context.begin_transaction():
            context.run_migrations()
        return

    def run(connection: Connection) -> None:
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()

    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
    else:
        _on_connection(url, run)


def _on_connection(url: str, work: Callable[[Connection], Any]) -> Any:
    from shared.db import create_engine

    async def go() -> Any:
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                return await connection.run_sync(work)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def alembic_config(url: str, location: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(location))
    config.attributes["url"] = url
    config.attributes["skip_logging"] = True
    return config


def history_config(history: History, url: str) -> Config:
    return alembic_config(url, history.location)


def private_sqlite_file(url: str) -> Path | None:
    """Create the SQLite file of `url` readable by its owner only (0600), or narrow an existing
    one: it holds the encrypted passwords, the tenants' API key digests and every email.

    SQLite gives its journal and WAL files the database file's permissions. Returns the path,
    or None for another database or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    path.chmod(0o600)
    return path


def upgrade_database(url: str) -> None:
    """Bring every service's tables at `url` to their latest revision. Synchronous: call it
    outside a loop."""
    private_sqlite_file(url)
    if _version_tables(url)[0]:
        _hand_over_legacy(url)
    for history in HISTORIES:
        command.upgrade(history_config(history, url), "head")


def _version_tables(url: str) -> tuple[bool, set[str]]:
    """Whether the shared history's table exists, and which services' version tables hold a
    revision."""

    def look(connection: Connection) -> tuple[bool, set[str]]:
        names = set(inspect(connection).get_table_names())
        stamped = {
            history.service
            for history in HISTORIES
            if history.version_table in names
            and connection.execute(
                select(func.count()).select_from(table(history.version_table))
            ).scalar()
        }
        return LEGACY_VERSION_TABLE in names, stamped

    result: tuple[bool, set[str]] = _on_connection(url, look)
    return result


def _hand_over_legacy(url: str) -> None:
    command.upgrade(alembic_config(url, LEGACY), LEGACY_HEAD)
    _, stamped = _version_tables(url)
    for history in HISTORIES:
        if history.service not in stamped:
            command.stamp(history_config(history, url), history.baseline)
    _on_connection(url, lambda c: c.execute(text(f"DROP TABLE {LEGACY_VERSION_TABLE}")))
    logger.info("the shared migration history was handed over to each service's own")


def upgrade_when_reachable(url: str, *, limit_seconds: float = 600.0) -> None:
    """`upgrade_database`, waiting with backoff while the database does not answer (a service
    started before its database logs what it waits for instead of exiting)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    deadline = time.monotonic() + limit_seconds
    delay = 0.5
    while True:
        try:
            upgrade_database(url)
            return
        except (OperationalError, InterfaceError, OSError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "waiting for the database (%s); next try in %.1f s", type(exc).__name__, delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def downgrade_database(url: str, revision: str = "base") -> None:
    """Take every service's tables down to `revision` ("base": none left), in reverse order."""
    for history in reversed(HISTORIES):
        command.downgrade(history_config(history, url), revision)
