"""HTTP routes of the registry."""

from fastapi import APIRouter

from services.registry.api import internal, oauth, servers, tenants

router = APIRouter()
router.include_router(tenants.router)
router.include_router(oauth.router)
router.include_router(servers.router)
router.include_router(internal.router)
