"""HTTP routes of the scheduler."""

from fastapi import APIRouter

from services.scheduler.api import (
    internal,
    messages,
    sending_profile,
    suppressions,
    unsubscribe,
    warmup,
)
from shared.problems import KnownQueryOnly

# Every route refuses query parameters its spec does not list.
router = APIRouter(dependencies=[KnownQueryOnly])
router.include_router(messages.router)
router.include_router(warmup.router)
router.include_router(sending_profile.router)
router.include_router(suppressions.router)
router.include_router(unsubscribe.router)
# Served (token-protected) but not advertised: the public spec lists public routes only, and
# openapi/internal.json documents these for the other services.
router.include_router(internal.router, include_in_schema=False)
