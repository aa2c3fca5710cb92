"""The tenant's sending profile: its time zone and the hours its servers may send in."""

from __future__ import annotations

from fastapi import APIRouter

from services.scheduler.deps import TenantDep
from services.scheduler.models import (
    SendingProfile,
    SendingProfilePublic,
    SendingProfileUpdate,
)
from shared.db import SessionDep

router = APIRouter(prefix="/v1/sending-profile", tags=["sending-profile"])


@router.get("", summary="Time zone and sending hours (UTC, all day, unless set)")
async def get_sending_profile(tenant: TenantDep, session: SessionDep) -> SendingProfilePublic:
    """A tenant that never set one sends all day, by UTC."""
    profile = await session.get(SendingProfile, tenant.id) or SendingProfile(tenant_id=tenant.id)
    return SendingProfilePublic.model_validate(profile, from_attributes=True)


@router.put("", summary="Set the time zone (IANA) and the sending hours [start_hour, end_hour)")
async def set_sending_profile(
    body: SendingProfileUpdate, tenant: TenantDep, session: SessionDep
) -> SendingProfilePublic:
    """Servers send only from `start_hour` to before `end_hour` in `time_zone`; the day's
    allowance is spread over those hours."""
    profile = await session.get(SendingProfile, tenant.id) or SendingProfile(tenant_id=tenant.id)
    profile.time_zone, profile.start_hour, profile.end_hour = (
        body.time_zone,
        body.start_hour,
        body.end_hour,
    )
    session.add(profile)
    return SendingProfilePublic.model_validate(profile, from_attributes=True)
