"""Tenants: created by an operator with the admin token."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.registry import repository
from shared.db import SessionDep
from shared.tenancy import (
    AdminDep,
    Tenant,
    TenantCreate,
    TenantCreated,
    hash_api_key,
    new_api_key,
)

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[AdminDep],
    summary="Create a tenant; its API key is shown only in this response",
)
async def create_tenant(body: TenantCreate, session: SessionDep) -> TenantCreated:
    """Needs the operator's admin token (`ABL_ADMIN_TOKEN`), not a tenant key. Only the key's
    SHA-256 is stored: keep `api_key` from this answer, it cannot be read again."""
    api_key = new_api_key()
    tenant = Tenant(name=body.name, api_key_hash=hash_api_key(api_key), api_key_prefix=api_key[:12])
    await repository.add_tenant(session, tenant)
    return TenantCreated(
        id=tenant.id,
        name=tenant.name,
        api_key_prefix=tenant.api_key_prefix,
        created_at=tenant.created_at,
        api_key=api_key,
    )
