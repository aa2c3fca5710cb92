"""Alembic environment of the scheduler's own tables (the runner is shared/migrate.py):
`alembic -n scheduler upgrade head`, or `python -m services.cli migrate` for every service."""

from shared.migrate import run_environment

run_environment("scheduler")
