"""Tenants and how a request proves which tenant it speaks for.

The registry owns the `tenants` table (services/registry/models.py); the other services keep a
copy of what they need of it (`shared/copies.py`). Every service authenticates tenants through
this module, each against its own table.
API keys are random 256-bit tokens, so a SHA-256 digest is enough to store them: no slow hash is
needed against guessing, and a lookup by digest stays one indexed query.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.errors import Unauthorized, raises
from shared.settings import CommonSettings, InternalTokenSettings, RegistrySettings

API_KEY_PREFIX = "abl_"
SettingsT = TypeVar("SettingsT", bound=CommonSettings)

bearer = HTTPBearer(auto_error=False, description="A tenant API key, or a service token.")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


@dataclass(frozen=True)
class AuthenticatedTenant:
    """The tenant a request speaks for, as every service's routes see it."""

    id: uuid.UUID
    name: str


class TenantLookup(Protocol):
    """Who an API key's digest belongs to: the registry's own `tenants` table, or the copy of
    it that each other service keeps in its own tables (`shared/copies.py`)."""

    async def authenticate(self, digest: str) -> AuthenticatedTenant | None: ...


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def tokens_equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _settings_of(request: Request, kind: type[SettingsT]) -> SettingsT:
    settings = request.app.state.settings
    # A service's app holds its own settings class (or the combined one, which is all of them).
    assert isinstance(settings, kind), f"{type(settings).__name__} has no {kind.__name__}"
    return settings


def get_registry_settings(request: Request) -> RegistrySettings:
    return _settings_of(request, RegistrySettings)


def get_internal_settings(request: Request) -> InternalTokenSettings:
    return _settings_of(request, InternalTokenSettings)


def tenant_dependency(service: str) -> Callable[..., Awaitable[AuthenticatedTenant]]:
    """The dependency of `service`'s routes (each declares
    `TenantDep = Annotated[AuthenticatedTenant, Depends(tenant_dependency(...))]`): the key is
    looked up in the `TenantLookup` that service put in `app.state.tenant_lookups[service]`
    when it started."""

    @raises(Unauthorized)
    async def current_tenant(request: Request, credentials: BearerDep) -> AuthenticatedTenant:
        if credentials is None or not credentials.credentials.startswith(API_KEY_PREFIX):
            raise Unauthorized("A tenant API key is required.")
        lookup: TenantLookup = request.app.state.tenant_lookups[service]
        found = await lookup.authenticate(hash_api_key(credentials.credentials))
        if found is None:
            raise Unauthorized("This API key is not valid.")
        return found

    return current_tenant


def add_tenant_lookup(app: Any, service: str, lookup: TenantLookup) -> None:
    lookups: dict[str, TenantLookup] = getattr(app.state, "tenant_lookups", {})
    lookups[service] = lookup
    app.state.tenant_lookups = lookups


@raises(Unauthorized)
def require_admin(
    settings: Annotated[RegistrySettings, Depends(get_registry_settings)], credentials: BearerDep
) -> None:
    expected = settings.admin_token.get_secret_value()
    if credentials is None or not tokens_equal(credentials.credentials, expected):
        raise Unauthorized("The admin token is required.", hint="Use ABL_ADMIN_TOKEN.")


@raises(Unauthorized)
def require_internal(
    settings: Annotated[InternalTokenSettings, Depends(get_internal_settings)],
    credentials: BearerDep,
) -> None:
    expected = settings.internal_token.get_secret_value()
    if credentials is None or not tokens_equal(credentials.credentials, expected):
        raise Unauthorized("The internal token is required.", hint="Use ABL_INTERNAL_TOKEN.")


AdminDep = Depends(require_admin)
InternalDep = Depends(require_internal)
