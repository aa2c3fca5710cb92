"""HTTP routes of the registry."""

from fastapi import APIRouter

from services.registry.api import internal, servers, tenants
from shared.errors import KnownQueryOnly

# Every route refuses query parameters its spec does not list.
router = APIRouter(dependencies=[KnownQueryOnly])
router.include_router(tenants.router)
router.include_router(servers.router)
# Served (token-protected) but not advertised: the public spec lists public routes only, and
# openapi/internal.json documents these for the other services.
router.include_router(internal.router, include_in_schema=False)
