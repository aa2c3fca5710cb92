"""Warmup progress of one server, and how many servers a monthly volume needs."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request

from services.scheduler import domain, repository
from services.scheduler.deps import RegistryCopyDep, TenantDep
from services.scheduler.dispatcher import schedule_from
from services.scheduler.models import CapacityPublic, ReputationPublic, WarmupDay, WarmupPublic
from services.scheduler.registry_copy import tenant_server, tenant_servers
from shared.db import SessionDep
from shared.errors import ServerNotFound, raises, server_not_found
from shared.settings import SchedulerSettings
from shared.spec import example_response
from shared.timeutil import utcnow

router = APIRouter()

WARMUP_EXAMPLE = {
    "server_id": "0193a5d2-7c4e-7b1a-9f3e-2d6c8b1a4e77",
    "status": "active",
    "step": 3,
    "top_step": 12,
    "provider": "gmail",
    "daily_limit": 500,
    "per_minute_limit": None,
    "allowance_today": 40,
    "sent_today": 12,
    "reserved_today": 14,
    "remaining_today": 26,
    "rolling_24h_used": 31,
    "parked_until": None,
    "next_send_at": "2026-11-27T10:12:00Z",
    "reputation": {
        "sample": 120,
        "bounce_rate": 0.0167,
        "complaint_rate": 0.0,
        "bounce_pause_ratio": 0.05,
        "complaint_pause_ratio": 0.001,
        "bounced_today": 1,
        "climb_held_today": False,
    },
    "projection": [
        {"day": "2026-11-28", "step": 4, "allowance": 60},
        {"day": "2026-11-29", "step": 5, "allowance": 80},
    ],
}


def app_settings(request: Request) -> SchedulerSettings:
    settings: SchedulerSettings = request.app.state.settings
    return settings


@router.get(
    "/v1/servers/{server_id}/warmup",
    tags=["warmup"],
    summary="Warmup step, today's allowance, 30 days ahead",
)
@example_response(200, WARMUP_EXAMPLE)
@raises(ServerNotFound)
async def get_warmup(
    server_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    request: Request,
    copy: RegistryCopyDep,
) -> WarmupPublic:
    """A fresh server sends a little on its first day and more each day it sends, up to its
    provider's daily limit (Gmail 500 in a rolling 24 h). `allowance_today` is what it may send
    today, `remaining_today` what is left, `next_send_at` when it sends next, `projection` the
    next 30 days if it sends every day."""
    settings = app_settings(request)
    await copy.ensure_server(tenant.id, server_id)
    server = await tenant_server(session, tenant.id, server_id)
    if server is None:
        raise server_not_found(server_id)
    schedule = schedule_from(settings)
    now = utcnow()
    window = await repository.sending_window(session, tenant.id)
    today = window.local_day(now)
    warmup = await repository.warmup_state(session, server, today, schedule, window)
    limits = repository.limits_of(server, schedule)
    allowance = schedule.allowance(warmup.step, limits.top)
    day = await repository.server_day(session, server, today, allowance)
    rolling = (await repository.rolling_usage(session, [server.id], now)).get(server.id, 0)
    parked = warmup.parked_until if warmup.parked_until and warmup.parked_until > now else None
    next_at = (
        None
        if not server.sendable
        else max(
            parked or now,
            domain.next_send_time(
                now=now,
                window=window,
                allowance=day.allowance,
                used_today=day.reserved,
                pacing=settings.pacing,
                jitter_key=str(server.id),
            ),
        )
    )
    state = domain.WarmupState(warmup.step, today, warmup.idle_days)
    counts = await repository.bounce_counts(session, server.id, settings.bounce_window)
    bounced_today = (
        (await repository.bounced_by_day(session, [server.id], today, window))
        .get(server.id, {})
        .get(today, 0)
    )
    return WarmupPublic(
        server_id=server.id,
        status=server.status,
        step=warmup.step,
        top_step=schedule.top_step(limits.top),
        provider=limits.provider,
        daily_limit=limits.top,
        per_minute_limit=limits.per_minute,
        allowance_today=day.allowance,
        sent_today=day.sent,
        reserved_today=day.reserved,
        remaining_today=max(0, day.allowance - day.reserved),
        rolling_24h_used=rolling,
        parked_until=parked,
        next_send_at=next_at,
        reputation=ReputationPublic(
            sample=counts.sent,
            bounce_rate=domain.ratio(counts.hard, counts.sent),
            complaint_rate=domain.ratio(counts.complaints, counts.sent),
            bounce_pause_ratio=settings.bounce_pause_ratio,
            complaint_pause_ratio=settings.complaint_pause_ratio,
            bounced_today=bounced_today,
            climb_held_today=domain.climb_held(
                day.sent, bounced_today, settings.bounce_pause_ratio
            ),
        ),
        projection=[
            WarmupDay(day=d, step=s, allowance=a)
            for d, s, a in domain.projection(state, 30, schedule, limits.top)
        ],
    )


@router.get(
    "/v1/capacity",
    tags=["capacity"],
    summary="How many servers a monthly volume needs, warmup counted",
)
async def get_capacity(
    tenant: TenantDep,
    session: SessionDep,
    request: Request,
    monthly_emails: Annotated[int, Query(ge=0, le=100_000_000)],
) -> CapacityPublic:
    """Servers needed for `monthly_emails`, with the configured headroom, beside how many
    active servers the tenant has."""
    settings = app_settings(request)
    advice = domain.capacity(
        monthly_emails, schedule_from(settings), headroom=settings.capacity_headroom
    )
    active = [s for s in await tenant_servers(session, tenant.id) if s.sendable]
    return CapacityPublic(
        **dataclasses.asdict(advice),
        headroom=settings.capacity_headroom,
        active_servers=len(active),
    )
