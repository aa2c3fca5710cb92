"""What every service's FastAPI app has: problem+json errors, metrics, health probes, and the
database opened in the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import text

from shared.db import create_engine, session_factory
from shared.errors import ServiceUnavailable, raises
from shared.limits import BodyLimitMiddleware
from shared.metrics import install_metrics
from shared.migrate import private_sqlite_file
from shared.problems import install_problem_handlers
from shared.settings import CommonSettings, DatabaseSettings
from shared.spec import install_spec, operation_id

DESCRIPTION = """The sending backend of ABillionLeads: tenants add their own SMTP servers, queue
emails, and read back what happened to each.

Authenticate with `Authorization: Bearer <API key>` (`POST /v1/tenants`, with the operator's
admin token, creates a tenant and shows its key once). Every error is
`application/problem+json` with a stable `code` to switch on and a `hint` a person can act on;
each operation lists the codes it can answer. Lists are paginated by an opaque `cursor` (pass
the previous page's `next_cursor`) and a `limit`."""

Resource = Callable[[FastAPI], AbstractAsyncContextManager[None]]
ReadinessCheck = Callable[[], Awaitable[bool]]
Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]

logger = logging.getLogger("abl.app")


@asynccontextmanager
async def background_loops(*loops: Loop, grace_seconds: float = 30) -> AsyncIterator[None]:
    """Run loops that watch a stop event for the life of the block.

    On the way out each loop is asked to stop and given `grace_seconds` to finish the batch it
    holds (a loop cut mid-batch leaves work for the sweep instead of finishing it); one that
    failed or overran is logged and the others are still waited for, so the resources closed
    after this block are never closed under a running loop.
    """
    stop = asyncio.Event()
    tasks = [asyncio.create_task(loop(stop)) for loop in loops]
    try:
        yield
    finally:
        stop.set()
        for task in tasks:
            try:
                await asyncio.wait_for(task, timeout=grace_seconds)
            except (asyncio.CancelledError, TimeoutError):
                logger.warning("background loop %s did not stop in time", task.get_coro())
            except Exception:
                logger.exception("background loop %s failed", task.get_coro())


def add_readiness_check(app: FastAPI, check: ReadinessCheck) -> None:
    """Register what /readyz must find working before traffic is sent to this process."""
    app.state.readiness_checks.append(check)


class NotReady(ServiceUnavailable):
    """A dependency this process needs (database, broker, consumer) is not working yet."""

    code = "not_ready"
    default_detail = "Not ready."
    hint = "Wait: the probe answers 200 once every dependency works."


class Health(BaseModel):
    status: str


def database(settings: DatabaseSettings) -> Resource:
    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        private_sqlite_file(settings.database_url)  # before the engine creates it 0644
        engine = create_engine(settings.database_url)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)

        async def database_answers() -> bool:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            return True

        add_readiness_check(app, database_answers)
        try:
            yield
        finally:
            await engine.dispose()

    return resource


def build_app(
    *,
    title: str,
    service: str,
    settings: CommonSettings,
    resources: list[Resource],
    version: str = "0.1.0",
) -> FastAPI:
    """An app whose lifespan opens `resources` in order and closes them in reverse."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.readiness_checks = []
        async with AsyncExitStack() as stack:
            for resource in resources:
                await stack.enter_async_context(resource(app))
            yield

    app = FastAPI(
        title=title,
        version=version,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    install_spec(app)
    install_problem_handlers(app)
    install_metrics(app, service)
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_body_bytes,
        large_limit=settings.max_messages_body_bytes,
    )

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def get_liveness() -> Health:
        """200 while the process serves requests; no dependency is asked."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: the database and the broker answer, the worker consumes",
    )
    @raises(NotReady)
    async def get_readiness() -> Health:
        """200 once every dependency of this process works: traffic may be sent to it."""
        for check in app.state.readiness_checks:
            try:
                ready = await check()
            except Exception as exc:
                raise NotReady(f"Not ready: {type(exc).__name__}.") from exc
            if not ready:
                raise NotReady()
        return Health(status="ready")

    return app
