"""Connecting a Google or Microsoft mailbox with OAuth 2.0 (no password): the frontend starts a
flow with the tenant's key and sends the browser to the provider; the provider sends it back to
the public callback, which stores the server and redirects to the frontend."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import PlainTextResponse, RedirectResponse, Response

from services.registry.deps import KeyringDep, LimiterDep, TenantDep, VerifierDep
from services.registry.models import OAuthFlow, OAuthFlowStatus, OAuthStart, OAuthStarted
from services.registry.oauth import flows
from services.registry.oauth.client import OAuthClient
from services.registry.oauth.providers import Provider
from shared.db import SessionDep
from shared.errors import NotFound, ServerNotFound, raises
from shared.settings import RegistrySettings
from shared.tenancy import get_registry_settings
from shared.timeutil import utcnow

logger = logging.getLogger("abl.registry.oauth")

router = APIRouter(tags=["oauth"])


class OAuthFlowNotFound(NotFound):
    """No connection was started with this state (by this tenant)."""

    code = "oauth_flow_not_found"
    default_detail = "No connection was started with this state."
    hint = "Start one with POST /v1/servers/oauth/{provider}/start."


SettingsDep = Annotated[RegistrySettings, Depends(get_registry_settings)]

CALLBACK_ERRORS = (
    ", ".join(flows.CALLBACK_ERRORS)
    + ", and the connection check's codes (auth_failed, tls_failed, connect_failed, timeout, ...)"
)


def _providers(request: Request) -> dict[str, Provider]:
    providers: dict[str, Provider] = request.app.state.oauth_providers
    return providers


def _client(request: Request) -> OAuthClient:
    client: OAuthClient = request.app.state.oauth_client
    return client


@router.post(
    "/v1/servers/oauth/{provider}/start",
    status_code=status.HTTP_201_CREATED,
    summary="Start connecting a Google or Microsoft mailbox: the URL to send the browser to",
)
@raises(flows.OAuthProviderNotConfigured, ServerNotFound)
async def start_oauth(
    provider: str,
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    limiter: LimiterDep,
    settings: SettingsDep,
    request: Request,
    body: OAuthStart | None = None,
) -> OAuthStarted:
    """Send the browser to `authorize_url`; the provider sends it back to the callback, which
    checks the mailbox with XOAUTH2, stores the server and redirects to the frontend. Poll
    `GET /v1/servers/oauth/flows/{state}` meanwhile. With `server_id`, the flow reconnects an
    existing OAuth server. Takes one of the tenant's connection checks."""
    configured = _providers(request)
    chosen = configured.get(provider)
    if chosen is None:
        raise flows.provider_missing(configured)
    # The callback runs a connection check; the start is where the tenant's budget is taken.
    limiter.take(tenant.id)
    url, state, expires_at = await flows.start(
        session,
        keyring,
        _client(request),
        chosen,
        tenant.id,
        body or OAuthStart(),
        settings.oauth_state_ttl_seconds,
    )
    return OAuthStarted(authorize_url=url, state=state, expires_at=expires_at)


@router.get(
    "/v1/servers/oauth/flows/{state}",
    summary="Where a started connection stands: pending, connected (with its server), failed",
)
@raises(OAuthFlowNotFound)
async def get_oauth_flow(state: str, tenant: TenantDep, session: SessionDep) -> OAuthFlowStatus:
    """`pending` until the browser comes back; then `connected` with `server_id`, or `failed`
    with the callback's `error`; `expired` when the state's time ran out unused."""
    try:
        flow_id = uuid.UUID(hex=state.split(".", 1)[0])
    except ValueError:
        flow_id = None
    flow = await session.get(OAuthFlow, flow_id) if flow_id else None
    if flow is None or flow.tenant_id != tenant.id:
        raise OAuthFlowNotFound()
    if flow.result_server_id is not None:
        return OAuthFlowStatus(status="connected", server_id=flow.result_server_id)
    if flow.result_error is not None:
        return OAuthFlowStatus(status="failed", error=flow.result_error)
    if flow.used_at is None and flow.expires_at <= utcnow():
        return OAuthFlowStatus(status="expired", error="state_expired")
    return OAuthFlowStatus(status="pending")


RESULT_PATH = "/v1/oauth/result"


def _land(frontend_url: str, **params: str) -> Response:
    """Send the browser on with the outcome: to the frontend, or (none configured) to the
    API's own short result page, by a path relative to the callback's origin."""
    target = frontend_url or RESULT_PATH
    separator = "&" if "?" in target else "?"
    return RedirectResponse(
        f"{target}{separator}{urlencode(params)}", status_code=status.HTTP_303_SEE_OTHER
    )


@router.get(
    RESULT_PATH,
    response_class=PlainTextResponse,
    summary="Where the callback lands when no frontend URL is configured: the outcome in words",
)
async def get_oauth_result(
    server_id: uuid.UUID | None = None,
    error: Annotated[str | None, Query(pattern=r"^[a-z0-9_]{1,40}$")] = None,
) -> PlainTextResponse:
    """A plain-text page for a person: "Connected" or the failure's code. No API key."""
    if server_id is not None:
        return PlainTextResponse(f"Connected: server {server_id}. You can close this window.\n")
    return PlainTextResponse(
        f"The connection failed ({error or 'unknown'}). Start again from the application.\n"
    )


@router.get(
    "/v1/oauth/callback",
    status_code=status.HTTP_303_SEE_OTHER,
    response_class=Response,
    responses={
        303: {
            "description": "To ABL_OAUTH_FRONTEND_REDIRECT_URL (or /v1/oauth/result) with "
            f"?server_id= or ?error=: {CALLBACK_ERRORS}"
        },
    },
    summary="The OAuth redirect URI: exchange the code, check with XOAUTH2, store the server",
)
async def finish_oauth(
    request: Request,
    keyring: KeyringDep,
    verifier: VerifierDep,
    settings: SettingsDep,
    state: Annotated[str, Query(max_length=200)] = "",
    code: Annotated[str | None, Query(max_length=4096)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Called by the provider's redirect, not by the frontend: no API key, the signed
    single-use `state` is the proof. Always answers 303, with `?server_id=` or `?error=`."""
    landing = settings.oauth_frontend_redirect_url
    sessions = request.app.state.sessions
    try:
        flow, code_verifier = await flows.claim(sessions, keyring, state)
    except flows.FlowError as exc:
        # No flow to record it on: a forged, replayed or expired state.
        flows.record_outcome(None, exc.code)
        return _land(landing, error=exc.code)
    try:
        if error is not None:
            # The tenant declined on the consent screen, or the provider refused the request.
            raise flows.FlowError(error)
        if not code:
            raise flows.FlowError("missing_code")
        provider = _providers(request).get(flow.provider)
        if provider is None:
            raise flows.FlowError("oauth_provider_not_configured")
        server_id = await flows.complete(
            sessions, keyring, _client(request), verifier, provider, flow, code, code_verifier
        )
    except flows.FlowError as exc:
        failure = exc.code
    except Exception as exc:
        # Whatever else went wrong, the browser lands on the frontend with a code, never a
        # stack trace; the log names the kind of failure only (the exception may hold tokens).
        logger.error("oauth callback failed: %s", type(exc).__name__)
        failure = "internal_error"
    else:
        await flows.finish(sessions, flow.id, server_id=server_id)
        flows.record_outcome(flow.provider, "connected")
        return _land(landing, server_id=str(server_id))
    await flows.finish(sessions, flow.id, error=failure)
    flows.record_outcome(flow.provider, failure)
    return _land(landing, error=failure)
