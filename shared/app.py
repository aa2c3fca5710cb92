"""What every service's FastAPI app has: problem+json errors, metrics and health probes."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI
from pydantic import BaseModel

from shared.errors import install_problem_handlers
from shared.metrics import install_metrics

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class Health(BaseModel):
    status: str


def build_app(*, title: str, service: str, lifespan: Lifespan, version: str = "0.1.0") -> FastAPI:
    app = FastAPI(title=title, version=version, lifespan=lifespan)
    install_problem_handlers(app)
    install_metrics(app, service)

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health(status="ok")

    return app
