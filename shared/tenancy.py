"""Tenants and how a request proves which tenant it speaks for.

The registry owns the `tenants` table (services/registry/models.py); every service authenticates
tenants through this module.
API keys are random 256-bit tokens, so a SHA-256 digest is enough to store them: no slow hash is
needed against guessing, and a lookup by digest stays one indexed query.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import String, Uuid, column, select, table
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

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


# The registry owns `tenants` (services/registry/models.py); the other services only look up an
# API key's digest in it, by the two columns named here.
_tenants = table(
    "tenants",
    column("id", Uuid),
    column("name", String),
    column("api_key_hash", String),
)


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


@raises(Unauthorized)
async def current_tenant(request: Request, credentials: BearerDep) -> AuthenticatedTenant:
    if credentials is None or not credentials.credentials.startswith(API_KEY_PREFIX):
        raise Unauthorized("A tenant API key is required.")
    digest = hash_api_key(credentials.credentials)
    # A session of its own, closed at once: the request's session must not hold a pooled
    # connection while the handler waits on a slow SMTP server.
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessions
    async with factory() as session:
        query = select(_tenants.c.id, _tenants.c.name).where(_tenants.c.api_key_hash == digest)
        row = (await session.exec(query)).first()  # type: ignore[call-overload]
    if row is None:
        raise Unauthorized("This API key is not valid.")
    return AuthenticatedTenant(id=row[0], name=row[1])


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


TenantDep = Annotated[AuthenticatedTenant, Depends(current_tenant)]
AdminDep = Depends(require_admin)
InternalDep = Depends(require_internal)
