"""Run the Alembic migrations from code: `make run`, the migration Job and the tests use it."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    config.attributes["skip_logging"] = True
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Bring the database at `url` up to `revision`. Synchronous: call it outside a loop."""
    command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
