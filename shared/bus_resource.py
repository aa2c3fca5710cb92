"""The bus as a lifespan resource: RabbitMQ for the stack, in memory for one process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shared.app import Resource
from shared.broker import Bus, InProcessBus, RabbitBus
from shared.settings import Settings


def rabbit_bus(settings: Settings) -> Resource:
    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        bus = RabbitBus(settings.amqp_url.get_secret_value())
        await bus.connect()
        app.state.bus = bus
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
