"""The sender service: a worker consuming send jobs, with liveness, readiness and /metrics on a
small HTTP port. SIGTERM (through uvicorn) stops consumption and drains in-flight jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from services.sender.clients import RegistryClient, SchedulerClient
from services.sender.delivery import Deliverer
from services.sender.worker import Worker
from shared.app import Resource, add_readiness_check, build_app
from shared.bus_resource import rabbit_bus
from shared.settings import Settings, get_settings

HTTP_TIMEOUT_SECONDS = 10.0


def sender_resources(settings: Settings, *, in_process: bool = False) -> Resource:
    """Needs `app.state.bus`. With `in_process`, the registry and scheduler are this same app."""

    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        def client(base_url: str) -> httpx.AsyncClient:
            if in_process:
                return httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url="http://in-process",
                    timeout=HTTP_TIMEOUT_SECONDS,
                )
            return httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT_SECONDS)

        token = settings.internal_token.get_secret_value()
        async with (
            client(settings.registry_url) as registry_http,
            client(settings.scheduler_url) as scheduler_http,
        ):
            deliverer = Deliverer(settings)
            worker = Worker(
                settings,
                app.state.bus,
                RegistryClient(registry_http, token, settings.credentials_ttl_seconds),
                SchedulerClient(scheduler_http, token),
                deliverer,
            )
            app.state.worker = worker
            await worker.start()
            consuming = True

            async def worker_consumes() -> bool:
                return consuming

            add_readiness_check(app, worker_consumes)
            try:
                yield
            finally:
                consuming = False
                await worker.drain(settings.sender_drain_seconds)
                await deliverer.close()

    return resource


def create_app(settings: Settings | None = None) -> FastAPI:
    resolved = settings or get_settings()
    return build_app(
        title="ABillionLeads sender",
        service="sender",
        settings=resolved,
        resources=[rabbit_bus(resolved), sender_resources(resolved)],
    )
