"""The sender service: a worker consuming send jobs, with liveness, readiness and /metrics on a
small HTTP port. SIGTERM (through uvicorn) stops consumption and drains in-flight jobs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from services.sender.clients import (
    BatchedJobStates,
    CachedCredentials,
    HttpJobStates,
    HttpRegistry,
    JobStates,
)
from services.sender.delivery import Deliverer
from services.sender.worker import Worker
from shared.app import Resource, add_readiness_check, build_app
from shared.bus_resource import rabbit_bus
from shared.messages import SmtpCredentials
from shared.settings import SenderSettings

HTTP_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Ports:
    """How this sender reaches the registry and the scheduler."""

    fetch_credentials: Callable[[uuid.UUID], Awaitable[SmtpCredentials | None]]
    report_auth_failure: Callable[[uuid.UUID, str], Awaitable[None]]
    job_states: JobStates
    # A new access token for an OAuth server that refused one: (server, SHA-256 of the token).
    refresh_credentials: Callable[[uuid.UUID, str], Awaitable[SmtpCredentials | None]]


PortsFactory = Callable[[FastAPI, AsyncExitStack], Awaitable[Ports]]


def http_ports(settings: SenderSettings) -> PortsFactory:
    """The stack: the registry's and the scheduler's internal HTTP routes."""

    async def make(_: FastAPI, stack: AsyncExitStack) -> Ports:
        token = settings.internal_token.get_secret_value()
        registry_http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=settings.registry_url, timeout=HTTP_TIMEOUT_SECONDS)
        )
        scheduler_http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=settings.scheduler_url, timeout=HTTP_TIMEOUT_SECONDS)
        )
        registry = HttpRegistry(registry_http, token)
        return Ports(
            registry.fetch, registry.report, HttpJobStates(scheduler_http, token), registry.refresh
        )

    return make


def sender_resources(settings: SenderSettings, ports: PortsFactory | None = None) -> Resource:
    """Needs `app.state.bus`. `ports` defaults to HTTP; the one-process shape passes calls."""

    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            wired = await (ports or http_ports(settings))(app, stack)
            deliverer = Deliverer(settings)
            worker = Worker(
                settings,
                app.state.bus,
                CachedCredentials(
                    wired.fetch_credentials,
                    wired.report_auth_failure,
                    settings.credentials_ttl_seconds,
                    wired.refresh_credentials,
                ),
                BatchedJobStates(wired.job_states),
                deliverer,
            )
            app.state.worker = worker
            await worker.start()

            async def worker_consumes() -> bool:
                return worker.consuming()

            add_readiness_check(app, worker_consumes)
            try:
                yield
            finally:
                await worker.drain(settings.sender_drain_seconds)
                await deliverer.close()

    return resource


def create_app(settings: SenderSettings | None = None) -> FastAPI:
    resolved = settings or SenderSettings()
    return build_app(
        title="ABillionLeads sender",
        service="sender",
        settings=resolved,
        resources=[rabbit_bus(resolved), sender_resources(resolved)],
    )
