"""The registry service: create_app and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text

from services.registry.api import router
from services.registry.deps import CheckLimiter
from services.registry.verifier import Verifier
from shared.app import Health, build_app
from shared.crypto import Keyring
from shared.db import create_engine, session_factory
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    resolved = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(resolved.database_url)
        app.state.settings = resolved
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.keyring = Keyring.from_keys(resolved.keys)
        app.state.verifier = Verifier(resolved)
        app.state.check_limiter = CheckLimiter(resolved)
        try:
            yield
        finally:
            await engine.dispose()

    app = build_app(
        title="ABillionLeads registry",
        service="registry",
        lifespan=lifespan,
    )
    app.include_router(router)

    @app.get("/readyz", tags=["health"], summary="Readiness: the database answers")
    async def readyz() -> Health:
        async with app.state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return Health(status="ready")

    return app
