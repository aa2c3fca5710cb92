"""Dependencies of the scheduler's routes, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.scheduler.dispatcher import Dispatcher
from services.scheduler.registry_copy import RegistryCopy
from shared.tenancy import AuthenticatedTenant, tenant_dependency


def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def get_registry_copy(request: Request) -> RegistryCopy:
    copy: RegistryCopy = request.app.state.copies["scheduler"]
    return copy


RegistryCopyDep = Annotated[RegistryCopy, Depends(get_registry_copy)]

# A tenant's API key, looked up in the scheduler's copy of the registry's tenants.
TenantDep = Annotated[AuthenticatedTenant, Depends(tenant_dependency("scheduler"))]
