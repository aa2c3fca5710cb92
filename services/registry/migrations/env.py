"""Alembic environment of the registry's own tables (the runner is shared/migrate.py):
`alembic -n registry upgrade head`, or `python -m services.cli migrate` for every service."""

from shared.migrate import run_environment

run_environment("registry")
