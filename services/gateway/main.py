"""A small reverse proxy for `make stack`: one base URL in front of the registry and the
scheduler. In Kubernetes the Ingress does this job (deploy/k8s)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from services.gateway.domain import route
from shared.app import Resource, build_app
from shared.errors import NotFound, UpstreamUnavailable
from shared.settings import GatewaySettings

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "api.json"
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length"}
)


def upstreams(settings: GatewaySettings) -> Resource:
    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        async with (
            httpx.AsyncClient(base_url=settings.registry_url, timeout=60) as registry,
            httpx.AsyncClient(base_url=settings.scheduler_url, timeout=60) as sched,
            httpx.AsyncClient(base_url=settings.webhooks_url, timeout=60) as hooks,
        ):
            app.state.upstreams = {"registry": registry, "scheduler": sched, "webhooks": hooks}
            yield

    return resource


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    resolved = settings or GatewaySettings()
    app = build_app(
        title="ABillionLeads gateway",
        service="gateway",
        settings=resolved,
        resources=[upstreams(resolved)],
    )

    @app.get("/openapi/api.json", include_in_schema=False)
    async def spec() -> JSONResponse:
        return JSONResponse(json.loads(SPEC.read_text()))

    @app.api_route(
        "/v1/{rest:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def proxy(request: Request, rest: str) -> Response:
        target = route(request.url.path)
        if target is None:
            raise NotFound("Not Found", hint="See /openapi/api.json for the API.")
        client: httpx.AsyncClient = request.app.state.upstreams[target]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            upstream = await client.request(
                request.method,
                request.url.path,
                params=request.query_params,
                content=await request.body(),
                headers=headers,
            )
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"The {target} service did not answer.") from exc
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return Response(upstream.content, status_code=upstream.status_code, headers=out)

    return app
