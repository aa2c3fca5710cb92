"""Run the Alembic migrations from code: `make run`, the migration Job and the tests use it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

logger = logging.getLogger("abl.migrate")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    config.attributes["skip_logging"] = True
    return config


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


def upgrade_database(url: str, revision: str = "head") -> None:
    """Bring the database at `url` up to `revision`. Synchronous: call it outside a loop."""
    private_sqlite_file(url)
    command.upgrade(alembic_config(url), revision)


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


def downgrade_database(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
