"""All services in one process: what `make run` serves, on SQLite and the in-process bus."""

from __future__ import annotations

from fastapi import FastAPI

from services.registry import main as registry
from services.scheduler import main as scheduler
from services.sender import main as sender
from shared.app import build_app, database
from shared.bus_resource import in_process_bus
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None, *, run_loops: bool = True) -> FastAPI:
    """Every service in one app; `run_loops=False` leaves dispatching and sending to a test."""
    resolved = settings or get_settings()
    app = build_app(
        title="ABillionLeads sending API",
        service="all",
        settings=resolved,
        resources=[
            database(resolved),
            in_process_bus(),
            registry.registry_resources(resolved),
            scheduler.scheduler_resources(resolved, run_loop=run_loops, recover_in_memory=True),
            *([sender.sender_resources(resolved, in_process=True)] if run_loops else []),
        ],
    )
    registry.install(app)
    scheduler.install(app)
    return app
