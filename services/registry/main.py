"""The registry service: create_app and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.registry.api import router
from services.registry.deps import CheckLimiter
from services.registry.verifier import Verifier
from shared.app import Resource, build_app, database
from shared.crypto import Keyring
from shared.settings import RegistrySettings


def registry_resources(settings: RegistrySettings) -> Resource:
    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        app.state.keyring = Keyring.from_keys(settings.keys)
        app.state.verifier = Verifier(settings)
        app.state.check_limiter = CheckLimiter(settings)
        yield

    return resource


def install(app: FastAPI) -> None:
    app.include_router(router)


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    resolved = settings or RegistrySettings()
    app = build_app(
        title="ABillionLeads registry",
        service="registry",
        settings=resolved,
        resources=[database(resolved), registry_resources(resolved)],
    )
    install(app)
    return app
