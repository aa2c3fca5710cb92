"""HTTP routes of the registry."""

from fastapi import APIRouter

from services.registry.api import internal, oauth, servers, tenants
from shared.problems import KnownQueryOnly

# Every API route refuses query parameters its spec does not list. Not the OAuth routes: the
# provider's redirect adds parameters of its own (scope, authuser, prompt, session_state, ...).
api = APIRouter(dependencies=[KnownQueryOnly])
api.include_router(tenants.router)
api.include_router(servers.router)

router = APIRouter()
router.include_router(api)
router.include_router(oauth.router)
# Served (token-protected) but not advertised: the public spec lists public routes only, and
# openapi/internal.json documents these for the other services.
router.include_router(internal.router, include_in_schema=False)
