"""Dependencies of the registry's routes, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.registry.oauth.tokens import TokenKeeper
from services.registry.service import Checker, CheckLimiter
from services.registry.verifier import Verifier
from shared.crypto import Keyring
from shared.errors import RateLimited, raises
from shared.tenancy import AuthenticatedTenant, tenant_dependency


def get_keyring(request: Request) -> Keyring:
    keyring: Keyring = request.app.state.keyring
    return keyring


def get_verifier(request: Request) -> Verifier:
    verifier: Verifier = request.app.state.verifier
    return verifier


# Whoever takes the limiter may be refused by it.
@raises(RateLimited)
def get_limiter(request: Request) -> CheckLimiter:
    limiter: CheckLimiter = request.app.state.check_limiter
    return limiter


def get_token_keeper(request: Request) -> TokenKeeper:
    keeper: TokenKeeper = request.app.state.token_keeper
    return keeper


KeyringDep = Annotated[Keyring, Depends(get_keyring)]
VerifierDep = Annotated[Verifier, Depends(get_verifier)]
LimiterDep = Annotated[CheckLimiter, Depends(get_limiter)]
TokenKeeperDep = Annotated[TokenKeeper, Depends(get_token_keeper)]


def get_checker(verifier: VerifierDep, limiter: LimiterDep) -> Checker:
    return Checker(verifier, limiter)


CheckerDep = Annotated[Checker, Depends(get_checker)]

# A tenant's API key, looked up in the registry's own `tenants`.
TenantDep = Annotated[AuthenticatedTenant, Depends(tenant_dependency("registry"))]
