"""HTTP routes of the scheduler."""

from fastapi import APIRouter

from services.scheduler.api import internal, messages, sending_profile, warmup

router = APIRouter()
router.include_router(messages.router)
router.include_router(warmup.router)
router.include_router(sending_profile.router)
router.include_router(internal.router)
