"""Access tokens of OAuth servers: kept encrypted in the server's row with their expiry,
handed to senders while they have time left, refreshed before they run out, and refreshed at
most once per server at a time however many senders ask.

Single flight works at two levels: inside a registry process one refresh per server runs and
every concurrent caller awaits it; across replicas the refresh takes the row's lock (`FOR
UPDATE` on PostgreSQL) and looks again, so a replica that waited finds the new token and does
not refresh a second time. A sender that saw its token refused names it (by digest): the
registry refreshes only if that token is still the current one.

A refresh answered `invalid_grant` (consent revoked, password changed, token expired) marks the
server `auth_failed`; the scheduler then gives it no more emails.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import repository
from services.registry.domain import AuthMethod, CheckCode, CheckOutcome
from services.registry.models import SmtpServer
from services.registry.oauth.client import OAuthClient, OAuthFailure
from services.registry.oauth.providers import Provider
from shared.crypto import Keyring
from shared.metrics import OAUTH_TOKEN_REFRESHES
from shared.timeutil import utcnow

logger = logging.getLogger("abl.registry.oauth")

# The provider's answers that mean the grant is gone for good: the tenant must reconnect.
GRANT_GONE = frozenset({"invalid_grant", "unauthorized_client", "invalid_client"})


class TokenUnavailable(Exception):
    """The provider could not be reached or answered badly; try again later."""


@dataclass(frozen=True)
class AccessToken:
    value: str
    expires_at: datetime

    def __repr__(self) -> str:
        return f"AccessToken(expires_at={self.expires_at.isoformat()})"


def token_digest(token: str) -> str:
    """How a sender names a token it saw refused, without sending it back."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenKeeper:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        client: OAuthClient,
        providers: dict[str, Provider],
        margin_seconds: float,
    ) -> None:
        self.sessions = sessions
        self.keyring = keyring
        self.client = client
        self.providers = providers
        self.margin = timedelta(seconds=margin_seconds)
        self.in_flight: dict[uuid.UUID, asyncio.Future[AccessToken | None]] = {}
        self.refreshes = 0  # provider calls made, for tests and logs

    def current(self, server: SmtpServer, rejected: str | None = None) -> AccessToken | None:
        """The stored token, if it has more than the margin left and is not the rejected one."""
        if not server.access_token_ciphertext or server.access_token_expires_at is None:
            return None
        if server.access_token_expires_at - self.margin <= utcnow():
            return None
        value = repository.open_token(
            self.keyring, server, repository.ACCESS_TOKEN, server.access_token_ciphertext
        )
        if rejected is not None and token_digest(value) == rejected:
            return None
        return AccessToken(value, server.access_token_expires_at)

    async def token(self, server: SmtpServer, rejected: str | None = None) -> AccessToken | None:
        """A usable access token for `server`, refreshed if needed; None when the server's
        grant is gone (it is then `auth_failed`). Raises TokenUnavailable."""
        found = self.current(server, rejected)
        if found is not None:
            return found
        pending = self.in_flight.get(server.id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[AccessToken | None] = asyncio.get_running_loop().create_future()
        self.in_flight[server.id] = future
        try:
            value = await self._refresh(server.id, rejected)
        except BaseException as exc:
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved, so an unawaited future logs nothing
            else:
                future.cancel()
            raise
        else:
            future.set_result(value)
            return value
        finally:
            self.in_flight.pop(server.id, None)

    async def _refresh(self, server_id: uuid.UUID, rejected: str | None) -> AccessToken | None:
        # The row lock is held while the provider answers (bounded by the HTTP timeout): that
        # is what makes a second replica wait and then find the new token.
        async with self.sessions() as session, session.begin():
            query = select(SmtpServer).where(SmtpServer.id == server_id).with_for_update()
            server = (await session.exec(query)).first()
            if server is None or server.auth != AuthMethod.xoauth2:
                return None
            found = self.current(server, rejected)
            if found is not None:
                return found  # another replica refreshed while this one waited for the lock
            provider = self.providers.get(server.oauth_provider or "")
            if provider is None or not server.refresh_token_ciphertext:
                self._grant_gone(server, "the OAuth provider is no longer configured")
                return None
            refresh_token = repository.open_token(
                self.keyring, server, repository.REFRESH_TOKEN, server.refresh_token_ciphertext
            )
            self.refreshes += 1
            try:
                tokens = await self.client.refresh(provider, refresh_token)
            except OAuthFailure as exc:
                if exc.code in GRANT_GONE:
                    OAUTH_TOKEN_REFRESHES.labels(provider.name, "grant_gone").inc()
                    logger.warning("server %s: refresh refused (%s)", server.id, exc.code)
                    self._grant_gone(server, f"{exc.code}: the provider refused the refresh")
                    session.add(server)
                    return None
                OAUTH_TOKEN_REFRESHES.labels(provider.name, "unavailable").inc()
                raise TokenUnavailable(exc.code) from None
            OAUTH_TOKEN_REFRESHES.labels(provider.name, "ok").inc()
            store_tokens(self.keyring, server, tokens.access_token, tokens.expires_at)
            if tokens.refresh_token and tokens.refresh_token != refresh_token:
                server.refresh_token_ciphertext = repository.seal_token(
                    self.keyring, server, repository.REFRESH_TOKEN, tokens.refresh_token
                )
            session.add(server)
            return AccessToken(tokens.access_token, tokens.expires_at)

    def _grant_gone(self, server: SmtpServer, reply: str) -> None:
        server.access_token_ciphertext = None
        server.access_token_expires_at = None
        server.record_check(CheckOutcome(CheckCode.auth_failed, reply), utcnow())


def store_tokens(keyring: Keyring, server: SmtpServer, access: str, expires_at: datetime) -> None:
    server.access_token_ciphertext = repository.seal_token(
        keyring, server, repository.ACCESS_TOKEN, access
    )
    server.access_token_expires_at = expires_at
