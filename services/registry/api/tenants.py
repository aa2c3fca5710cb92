"""Tenants: created by an operator with the admin token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, status
from fastapi.openapi.models import Example

from services.registry import service
from services.registry.models import TenantCreate, TenantCreated
from shared.db import SessionDep
from shared.spec import example_response
from shared.tenancy import AdminDep

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[AdminDep],
    summary="Create a tenant; its API key is shown only in this response",
)
@example_response(
    status.HTTP_201_CREATED,
    {
        "id": "0193a5d1-0b2c-7d3e-8f40-5a6b7c8d9e0f",
        "name": "Acme",
        "api_key_prefix": "abl_Xq3k9Zp",
        "created_at": "2026-11-27T09:00:00Z",
        "api_key": "abl_Xq3k9ZpR2mV8sT1uW4yB6nC0dE5fG7hJ9kL2",
    },
)
async def create_tenant(
    body: Annotated[
        TenantCreate,
        Body(openapi_examples={"acme": Example(summary="A tenant", value={"name": "Acme"})}),
    ],
    session: SessionDep,
) -> TenantCreated:
    """Needs the operator's admin token (`ABL_ADMIN_TOKEN`), not a tenant key. Only the key's
    SHA-256 is stored: keep `api_key` from this answer, it cannot be read again."""
    return await service.create_tenant(session, body.name)
