"""The webhooks service: create_app, the events consumer and the delivery loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.webhooks.api import router
from services.webhooks.delivery import Deliverer, Intake
from services.webhooks.models import WebhooksCopyState, WebhooksTenant
from shared.app import Resource, add_readiness_check, background_loops, build_app, database
from shared.bus_resource import rabbit_bus
from shared.copies import CopyKeeper, SourceFactory, copy_resource, registry_source_over_http
from shared.crypto import Keyring
from shared.db import table_of
from shared.settings import WebhookSettings

EVENT_PREFETCH = 64


def webhooks_resources(settings: WebhookSettings, *, run_loop: bool = True) -> Resource:
    """Needs `app.state.sessions` and `app.state.bus` from resources opened before it."""

    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        bus = app.state.bus
        app.state.keyring = Keyring.from_keys(settings.keys)
        deliverer = Deliverer(app.state.sessions, app.state.keyring, settings)
        intake = Intake(app.state.sessions, settings, deliverer)
        app.state.webhook_deliverer = deliverer
        app.state.webhook_intake = intake
        await bus.consume(settings.events_queue, intake.handle, prefetch=EVENT_PREFETCH)

        async def consuming() -> bool:
            return bool(bus.consuming(settings.events_queue))

        add_readiness_check(app, consuming)
        try:
            async with background_loops(*([deliverer.run] if run_loop else [])):
                try:
                    yield
                finally:
                    # No new event is taken while the deliveries in hand finish.
                    await bus.stop_consuming(settings.events_queue)
        finally:
            await deliverer.close()

    return resource


def webhooks_copy(
    settings: WebhookSettings, source: SourceFactory, *, run_loop: bool = True
) -> Resource:
    """The webhooks service's copy of the registry's tenants (whose API key is whose)."""
    return copy_resource(
        settings,
        "webhooks",
        lambda sessions, opened: CopyKeeper(
            sessions,
            opened,
            table_of(WebhooksTenant),
            table_of(WebhooksCopyState),
            service="webhooks",
            resync_seconds=settings.copy_resync_seconds,
        ),
        source,
        run_loop=run_loop,
    )


def install(app: FastAPI) -> None:
    app.include_router(router)


def create_app(settings: WebhookSettings | None = None) -> FastAPI:
    resolved = settings or WebhookSettings()
    app = build_app(
        title="ABillionLeads webhooks",
        service="webhooks",
        settings=resolved,
        resources=[
            database(resolved),
            rabbit_bus(resolved),
            webhooks_copy(resolved, registry_source_over_http),
            webhooks_resources(resolved),
        ],
    )
    install(app)
    return app
