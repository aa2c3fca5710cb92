"""Alembic environment of the webhooks's own tables (the runner is shared/migrate.py):
`alembic -n webhooks upgrade head`, or `python -m services.cli migrate` for every service."""

from shared.migrate import run_environment

run_environment("webhooks")
