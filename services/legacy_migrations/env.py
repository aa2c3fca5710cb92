"""The shared history the services had before each owned its own (frozen at 0013).

Only `shared/migrate.py` runs it, to bring a database created then to 0013 before handing it
over to the services' histories; nothing is added here any more.
"""

from __future__ import annotations

from alembic import context

from shared.migrate import LEGACY_VERSION_TABLE, _on_connection


def run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        version_table=LEGACY_VERSION_TABLE,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_on_connection(str(context.config.attributes["url"]), run)
