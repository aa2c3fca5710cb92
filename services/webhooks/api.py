"""A tenant's webhook endpoints and their delivery log."""

from __future__ import annotations

import base64
import secrets
import socket
import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request, Response, status
from fastapi.openapi.models import Example
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.webhooks import delivery as engine
from services.webhooks import domain
from services.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookAttemptPage,
    WebhookAttemptPublic,
    WebhookDelivery,
    WebhookDeliveryPage,
    WebhookDeliveryPublic,
    WebhookEndpoint,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointPage,
    WebhookEndpointPublic,
    WebhookEndpointUpdate,
)
from shared import addresses
from shared.crypto import Keyring
from shared.db import SessionDep
from shared.errors import NotFound, raises
from shared.pagination import (
    CursorQuery,
    InvalidCursor,
    Limit200Query,
    decode_cursor,
    encode_cursor,
)
from shared.problems import KnownQueryOnly
from shared.settings import WebhookSettings
from shared.tenancy import AuthenticatedTenant, tenant_dependency
from shared.timeutil import utcnow

# A tenant's API key, looked up in the webhooks service's copy of the registry's tenants.
TenantDep = Annotated[AuthenticatedTenant, Depends(tenant_dependency("webhooks"))]

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], dependencies=[KnownQueryOnly])


class WebhookNotFound(NotFound):
    """No webhook endpoint with this id for this tenant."""

    code = "webhook_not_found"
    default_detail = "No such webhook endpoint."
    hint = "List your endpoints with GET /v1/webhooks."


class DeliveryNotFound(NotFound):
    """No delivery with this id for this endpoint."""

    code = "delivery_not_found"
    default_detail = "No such delivery."
    hint = "List the endpoint's deliveries with GET /v1/webhooks/{endpoint_id}/deliveries."


def _settings(request: Request) -> WebhookSettings:
    settings = request.app.state.settings
    assert isinstance(settings, WebhookSettings)
    return settings


def new_secret() -> str:
    # 32 random bytes, in the `whsec_` + base64 form Standard Webhooks libraries read.
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def check_url(url: str, settings: WebhookSettings) -> None:
    """The SSRF rules of server checks: every address the host resolves to must be public,
    unless ABL_ALLOW_PRIVATE_HOSTS (which also allows plain http)."""
    target = domain.parse_target(url, allow_insecure=settings.allow_private_hosts)
    try:
        await addresses.checked_addresses(
            target.host, target.port, allow_private=settings.allow_private_hosts
        )
    except addresses.ForbiddenAddress as exc:
        raise domain.blocked_host() from exc
    except (socket.gaierror, UnicodeError) as exc:
        raise domain.dns_failed() from exc


def public(endpoint: WebhookEndpoint) -> WebhookEndpointPublic:
    return WebhookEndpointPublic.model_validate(endpoint, from_attributes=True)


async def owned(
    session: AsyncSession, tenant_id: uuid.UUID, endpoint_id: uuid.UUID
) -> WebhookEndpoint:
    endpoint = await session.get(WebhookEndpoint, endpoint_id)
    # Another tenant's endpoint answers exactly like one that does not exist.
    if endpoint is None or endpoint.tenant_id != tenant_id:
        raise WebhookNotFound()
    return endpoint


def encrypt_secret(request: Request, endpoint: WebhookEndpoint) -> str:
    """A new signing secret for `endpoint`, stored encrypted; returned to be shown once."""
    keyring: Keyring = request.app.state.keyring
    secret = new_secret()
    endpoint.secret_ciphertext = keyring.encrypt(
        secret, engine.secret_aad(endpoint.tenant_id, endpoint.id)
    )
    return secret


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Register an endpoint; its signing secret is returned once",
)
@raises(*domain.URL_ERRORS)
async def create_webhook(
    body: Annotated[
        WebhookEndpointCreate,
        Body(
            openapi_examples={
                "outcomes": Example(
                    summary="Email outcomes and server status changes",
                    value={
                        "url": "https://hooks.acme.com/abl",
                        "event_types": ["email.sent", "email.bounced", "server.status_changed"],
                        "description": "CRM sync",
                    },
                )
            }
        ),
    ],
    tenant: TenantDep,
    session: SessionDep,
    request: Request,
) -> WebhookEndpointCreated:
    """The URL gets the event types it names, signed by the Standard Webhooks scheme
    (`webhook-id`, `webhook-timestamp`, `webhook-signature`) with `secret`: keep it from this
    answer, it is not shown again. The URL must be https:// to a host that resolves to public
    addresses only (the rules of server checks)."""
    settings = _settings(request)
    await check_url(body.url, settings)
    endpoint = WebhookEndpoint(
        tenant_id=tenant.id,
        url=body.url,
        description=body.description,
        enabled=body.enabled,
        event_types=[t.value for t in body.event_types],
        secret_ciphertext="",
    )
    secret = encrypt_secret(request, endpoint)
    session.add(endpoint)
    await session.flush()
    return WebhookEndpointCreated(**public(endpoint).model_dump(), secret=secret)


@router.get("", summary="List the tenant's endpoints, oldest first")
@raises(InvalidCursor)
async def list_webhooks(
    tenant: TenantDep,
    session: SessionDep,
    limit: Limit200Query = 50,
    cursor: CursorQuery = None,
) -> WebhookEndpointPage:
    """Paginated: up to `limit` endpoints per page; pass `next_cursor` as `cursor` for the next
    page (null on the last). Secrets are never listed."""
    query = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant.id)
    if cursor is not None:
        query = query.where(col(WebhookEndpoint.id) > decode_cursor(cursor))
    rows = list(
        (await session.exec(query.order_by(col(WebhookEndpoint.id)).limit(limit + 1))).all()
    )
    page = rows[:limit]
    return WebhookEndpointPage(
        items=[public(e) for e in page],
        next_cursor=encode_cursor(page[-1].id) if len(rows) > limit else None,
    )


@router.get("/{endpoint_id}", summary="One endpoint")
@raises(WebhookNotFound)
async def get_webhook(
    endpoint_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> WebhookEndpointPublic:
    """With `disabled_reason` when it was switched off after failing for days."""
    return public(await owned(session, tenant.id, endpoint_id))


@router.patch(
    "/{endpoint_id}",
    summary="Change the URL, the event types, or enable and disable; enabling resumes the "
    "deliveries waiting for it",
)
@raises(WebhookNotFound, *domain.URL_ERRORS)
async def update_webhook(
    endpoint_id: uuid.UUID,
    body: WebhookEndpointUpdate,
    tenant: TenantDep,
    session: SessionDep,
    request: Request,
) -> WebhookEndpointPublic:
    """Only the fields sent change; a new URL is checked like on create. The secret stays."""
    endpoint = await owned(session, tenant.id, endpoint_id)
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if "url" in changes:
        await check_url(changes["url"], _settings(request))
        endpoint.url = changes["url"]
    if "description" in changes:
        endpoint.description = changes["description"]
    if "event_types" in changes:
        endpoint.event_types = [str(t) for t in changes["event_types"]]
    if "enabled" in changes:
        if changes["enabled"] and not endpoint.enabled:
            endpoint.disabled_reason = None
            endpoint.failing_since = None
        endpoint.enabled = changes["enabled"]
    endpoint.updated_at = utcnow()
    session.add(endpoint)
    await session.flush()
    if endpoint.enabled:
        request.app.state.webhook_deliverer.wake()
    return public(endpoint)


@router.delete(
    "/{endpoint_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove an endpoint and its delivery log",
)
@raises(WebhookNotFound)
async def delete_webhook(
    endpoint_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> Response:
    """Its pending deliveries are dropped with it."""
    endpoint = await owned(session, tenant.id, endpoint_id)
    await session.delete(endpoint)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{endpoint_id}/rotate-secret",
    summary="Replace the signing secret; the new one is returned once, and the old one keeps "
    "signing beside it for 24 hours",
)
@raises(WebhookNotFound)
async def rotate_webhook_secret(
    endpoint_id: uuid.UUID, tenant: TenantDep, session: SessionDep, request: Request
) -> WebhookEndpointCreated:
    """Keep `secret` from this answer: it is not shown again. Until `previous_secret_until`
    (`ABL_WEBHOOK_SECRET_OVERLAP_SECONDS`, 24 h) every request carries two signatures in
    `webhook-signature`, with the new and the previous secret, so a receiver verifies with
    either while it switches. A second rotation within that time drops the oldest secret."""
    endpoint = await owned(session, tenant.id, endpoint_id)
    now = utcnow()
    # A second rotation within the overlap drops the oldest secret: two sign at most.
    endpoint.previous_secret_ciphertext = endpoint.secret_ciphertext
    endpoint.previous_secret_until = now + timedelta(
        seconds=_settings(request).webhook_secret_overlap_seconds
    )
    secret = encrypt_secret(request, endpoint)
    endpoint.updated_at = now
    session.add(endpoint)
    await session.flush()
    return WebhookEndpointCreated(**public(endpoint).model_dump(), secret=secret)


def delivery_public(row: WebhookDelivery) -> WebhookDeliveryPublic:
    return WebhookDeliveryPublic.model_validate(row, from_attributes=True)


@router.get(
    "/{endpoint_id}/deliveries",
    summary="The endpoint's delivery log, newest first: status, attempts, last status code",
)
@raises(WebhookNotFound, InvalidCursor)
async def list_webhook_deliveries(
    endpoint_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    status_filter: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    limit: Limit200Query = 50,
    cursor: CursorQuery = None,
) -> WebhookDeliveryPage:
    """Filtered by `status`. Paginated: up to `limit` deliveries per page; pass `next_cursor`
    as `cursor` for the next (older) page, null on the last."""
    await owned(session, tenant.id, endpoint_id)
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if status_filter is not None:
        query = query.where(WebhookDelivery.status == status_filter)
    if cursor is not None:
        query = query.where(col(WebhookDelivery.id) < decode_cursor(cursor))
    rows = list(
        (await session.exec(query.order_by(col(WebhookDelivery.id).desc()).limit(limit + 1))).all()
    )
    page = rows[:limit]
    return WebhookDeliveryPage(
        items=[delivery_public(d) for d in page],
        next_cursor=encode_cursor(page[-1].id) if len(rows) > limit else None,
    )


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/redeliver",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a delivery again now (same `webhook-id`), with a new retry window",
)
@raises(WebhookNotFound, DeliveryNotFound)
async def redeliver_webhook(
    endpoint_id: uuid.UUID,
    delivery_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    request: Request,
) -> WebhookDeliveryPublic:
    """The receiver deduplicates by `webhook-id`, which stays the delivery's own."""
    await owned(session, tenant.id, endpoint_id)
    window = timedelta(seconds=_settings(request).webhook_retry_window_seconds)
    if not await engine.redeliver(session, delivery_id, endpoint_id, window):
        raise DeliveryNotFound()
    row = await session.get(WebhookDelivery, delivery_id, populate_existing=True)
    assert row is not None
    await session.commit()
    request.app.state.webhook_deliverer.wake()
    return delivery_public(row)


@router.get(
    "/{endpoint_id}/deliveries/{delivery_id}/attempts",
    summary="Every attempt of one delivery, first first: when, the answer, how long it took",
)
@raises(WebhookNotFound, DeliveryNotFound, InvalidCursor)
async def list_webhook_delivery_attempts(
    endpoint_id: uuid.UUID,
    delivery_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    limit: Limit200Query = 50,
    cursor: CursorQuery = None,
) -> WebhookAttemptPage:
    """The delivery row keeps the last attempt only; this is each one (`attempt` 1, 2, ...).
    Paginated: up to `limit` attempts per page; pass `next_cursor` as `cursor` for the next
    page, null on the last."""
    await owned(session, tenant.id, endpoint_id)
    found = await session.get(WebhookDelivery, delivery_id)
    if found is None or found.endpoint_id != endpoint_id:
        raise DeliveryNotFound()
    query = select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
    if cursor is not None:
        query = query.where(col(WebhookAttempt.id) > decode_cursor(cursor))
    rows = list((await session.exec(query.order_by(col(WebhookAttempt.id)).limit(limit + 1))).all())
    page = rows[:limit]
    return WebhookAttemptPage(
        items=[WebhookAttemptPublic.model_validate(a, from_attributes=True) for a in page],
        next_cursor=encode_cursor(page[-1].id) if len(rows) > limit else None,
    )
