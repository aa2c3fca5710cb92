"""Tenants and how a request proves which tenant it speaks for.

The registry owns the `tenants` table; other services authenticate tenants through this module.
API keys are random 256-bit tokens, so a SHA-256 digest is enough to store them: no slow hash is
needed against guessing, and a lookup by digest stays one indexed query.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import datetime
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import field_validator
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.errors import Unauthorized, raises
from shared.settings import CommonSettings, InternalTokenSettings, RegistrySettings
from shared.timeutil import UtcDateTime, new_id, utcnow
from shared.validation import OneLineText, refuse_control_chars

API_KEY_PREFIX = "abl_"
SettingsT = TypeVar("SettingsT", bound=CommonSettings)

bearer = HTTPBearer(auto_error=False, description="A tenant API key, or a service token.")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


class TenantBase(SQLModel):
    name: OneLineText = Field(min_length=1, max_length=200)

    @field_validator("name")
    @classmethod
    def _clean_name(cls, value: str) -> str:
        # min_length is checked before this strip: a name of spaces would pass it and then be
        # stored empty (and fail the response model with a 500).
        cleaned = refuse_control_chars(value).strip()
        if not cleaned:
            raise ValueError("must not be blank")
        return cleaned


class TenantCreate(TenantBase):
    pass


class TenantPublic(TenantBase):
    id: uuid.UUID
    api_key_prefix: str
    created_at: datetime


class TenantCreated(TenantPublic):
    api_key: str


class Tenant(TenantBase, table=True):
    __tablename__ = "tenants"

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    api_key_hash: str = Field(max_length=64, unique=True, index=True)
    api_key_prefix: str = Field(max_length=16)
    created_at: datetime = Field(
        default_factory=utcnow,
        sa_type=UtcDateTime,
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
async def current_tenant(request: Request, credentials: BearerDep) -> Tenant:
    if credentials is None or not credentials.credentials.startswith(API_KEY_PREFIX):
        raise Unauthorized("A tenant API key is required.")
    digest = hash_api_key(credentials.credentials)
    # A session of its own, closed at once: the request's session must not hold a pooled
    # connection while the handler waits on a slow SMTP server.
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessions
    async with factory() as session:
        query = select(Tenant).where(Tenant.api_key_hash == digest)
        tenant = (await session.exec(query)).first()
    if tenant is None:
        raise Unauthorized("This API key is not valid.")
    return tenant


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


TenantDep = Annotated[Tenant, Depends(current_tenant)]
AdminDep = Depends(require_admin)
InternalDep = Depends(require_internal)
