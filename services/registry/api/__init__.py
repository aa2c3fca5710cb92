"""HTTP routes of the registry."""

from fastapi import APIRouter

from services.registry.api import internal, oauth, servers, tenants

router = APIRouter()
router.include_router(tenants.router)
router.include_router(oauth.router)
router.include_router(servers.router)
# Served (token-protected) but not advertised: the public spec lists public routes only, and
# openapi/internal.json documents these for the other services.
router.include_router(internal.router, include_in_schema=False)
