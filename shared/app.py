"""What every service's FastAPI app has: problem+json errors, metrics, health probes, and the
database opened in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import text

from shared.db import create_engine, session_factory
from shared.errors import install_problem_handlers
from shared.metrics import install_metrics
from shared.settings import Settings

Resource = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class Health(BaseModel):
    status: str


def database(settings: Settings) -> Resource:
    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        try:
            yield
        finally:
            await engine.dispose()

    return resource


def build_app(
    *,
    title: str,
    service: str,
    settings: Settings,
    resources: list[Resource],
    version: str = "0.1.0",
) -> FastAPI:
    """An app whose lifespan opens `resources` in order and closes them in reverse."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        async with AsyncExitStack() as stack:
            for resource in resources:
                await stack.enter_async_context(resource(app))
            yield

    app = FastAPI(title=title, version=version, lifespan=lifespan)
    install_problem_handlers(app)
    install_metrics(app, service)

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", tags=["health"], summary="Readiness: the database answers")
    async def readyz() -> Health:
        async with app.state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return Health(status="ready")

    return app
