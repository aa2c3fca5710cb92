"""Dependencies of the registry's routes, as `Annotated` aliases."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import Depends, Request

from services.registry.domain import TokenBucket
from services.registry.oauth.tokens import TokenKeeper
from services.registry.verifier import Verifier
from shared.crypto import Keyring
from shared.errors import RateLimited, raises
from shared.settings import RegistrySettings


class CheckLimiter:
    """Per-tenant budget of connection checks, so the registry cannot be used to hammer a host.

    Held in memory per replica: with N registry replicas a tenant gets at most N times the rate.
    """

    def __init__(self, settings: RegistrySettings) -> None:
        self.rate = settings.verify_rate_per_minute / 60.0
        self.burst = float(settings.verify_burst)
        self.buckets: dict[uuid.UUID, TokenBucket] = {}

    def take(self, tenant_id: uuid.UUID) -> None:
        bucket = self.buckets.setdefault(tenant_id, TokenBucket(self.rate, self.burst))
        wait = bucket.take(time.monotonic())
        if wait > 0:
            raise RateLimited(
                "Too many connection checks for this tenant.",
                retry_after_seconds=int(wait) + 1,
            )


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
