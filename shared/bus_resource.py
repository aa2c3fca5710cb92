"""The bus as a lifespan resource: RabbitMQ for the stack, in memory for one process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shared.app import Resource, add_readiness_check
from shared.broker import Bus, InProcessBus, RabbitBus
from shared.settings import BrokerSettings


def rabbit_bus(settings: BrokerSettings, *, needed_for_readiness: bool = True) -> Resource:
    """`needed_for_readiness=False`: a service that only publishes from its outbox keeps
    serving while the broker is away (the outbox holds the events), so it stays ready."""

    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        # Connects in the background: a service started before the broker serves /healthz and
        # answers /readyz with 503 until the broker answers, instead of exiting.
        bus = RabbitBus(
            settings.amqp_url.get_secret_value(), wait_seconds=settings.broker_wait_seconds
        )
        bus.start()
        app.state.bus = bus

        async def broker_connected() -> bool:
            return bus.broker_up()

        if needed_for_readiness:
            add_readiness_check(app, broker_connected)
        try:
            yield
        finally:
            await bus.close()

    return resource


def in_process_bus() -> Resource:
    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        bus: Bus = InProcessBus()
        app.state.bus = bus
        try:
            yield
        finally:
            await bus.close()

    return resource
