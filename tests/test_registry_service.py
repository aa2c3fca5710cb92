"""The registry's use cases without HTTP: on SQLite through the session factory, against a real
SMTP server (aiosmtpd, STARTTLS, AUTH). What the routes add (parsing, status codes) is tested in
test_servers_api.py; here, what the one check sequence and the one pause rule do across use
cases."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import service
from services.registry.domain import Security, ServerStatus
from services.registry.models import SmtpServer, SmtpServerCreate, SmtpServerUpdate
from services.registry.oauth.tokens import TokenKeeper
from services.registry.repository import open_password
from services.registry.service import Checker, CheckFailed, CheckLimiter
from services.registry.verifier import Verifier
from shared.crypto import Keyring
from shared.db import create_engine, session_factory
from shared.errors import RateLimited
from tests.conftest import make_settings
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server

LOGIN = "dana@example.com"
PASSWORD = "dana-app-password"


@dataclass
class Registry:
    sessions: async_sessionmaker[AsyncSession]
    keyring: Keyring
    checker: Checker
    smtp: SmtpTestServer
    tenant_id: uuid.UUID

    async def add(self) -> SmtpServer:
        body = SmtpServerCreate(
            host="localhost",
            port=self.smtp.port,
            security=Security(self.smtp.security),
            username=LOGIN,
            password=SecretStr(PASSWORD),
            from_email=LOGIN,
            label="primary",
        )
        async with self.sessions() as session, session.begin():
            return await service.add_server(
                session, self.keyring, self.checker, self.tenant_id, body
            )

    async def verify(self, server_id: uuid.UUID) -> SmtpServer:
        async with self.sessions() as session, session.begin():
            return await service.verify_server(
                session, self.keyring, self.checker, no_tokens(), self.tenant_id, server_id
            )

    async def load(self, server_id: uuid.UUID) -> SmtpServer:
        async with self.sessions() as session:
            return await service.get_server(session, self.tenant_id, server_id)


@pytest.fixture
def own_smtp(certs: Certificates) -> Iterator[SmtpTestServer]:
    # A server of this test alone: the tests change its accounts.
    with smtp_server(certs, {LOGIN: PASSWORD}) as server:
        yield server


async def registry_on(sqlite_url: str, smtp: SmtpTestServer, burst: int) -> AsyncIterator[Registry]:
    settings = make_settings(sqlite_url, verify_burst=burst, verify_rate_per_minute=1)
    engine = create_engine(settings.database_url)
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        tenant = await service.create_tenant(session, "acme")
    checker = Checker(Verifier(settings), CheckLimiter(settings))
    try:
        yield Registry(sessions, Keyring.from_keys(settings.keys), checker, smtp, tenant.id)
    finally:
        await engine.dispose()


@pytest.fixture
async def registry(sqlite_url: str, own_smtp: SmtpTestServer) -> AsyncIterator[Registry]:
    async for value in registry_on(sqlite_url, own_smtp, burst=100):
        yield value


async def test_checks_of_a_paused_server_are_recorded_and_resume_takes_the_last(
    registry: Registry,
) -> None:
    added = await registry.add()
    assert added.status == ServerStatus.active
    async with registry.sessions() as session, session.begin():
        await service.pause_server(session, registry.tenant_id, added.id)
    # The mailbox's password changes at the provider: the next check fails.
    registry.smtp.recorder.accounts[LOGIN] = "changed-at-the-provider"
    await registry.verify(added.id)
    paused = await registry.load(added.id)
    assert paused.status == ServerStatus.paused, "a pause by hand wins over a check"
    assert paused.last_check_code == "auth_failed"
    assert paused.last_checked_at is not None
    assert added.last_checked_at is not None
    assert paused.last_checked_at >= added.last_checked_at
    async with registry.sessions() as session, session.begin():
        resumed = await service.resume_server(session, registry.tenant_id, added.id)
    assert resumed.status == ServerStatus.auth_failed, "resume takes the last check's outcome"
    registry.smtp.recorder.accounts[LOGIN] = PASSWORD
    checked = await registry.verify(added.id)
    assert (checked.status, checked.last_check_code) == (ServerStatus.active, None)


async def test_a_refused_update_changes_nothing(registry: Registry) -> None:
    added = await registry.add()
    before = await registry.load(added.id)
    attempts = len(registry.smtp.recorder.auth_attempts)
    body = SmtpServerUpdate(label="renamed", password=SecretStr("a wrong password"))
    with pytest.raises(CheckFailed) as refused:
        async with registry.sessions() as session, session.begin():
            await service.update_server(
                session, registry.keyring, registry.checker, registry.tenant_id, added.id, body
            )
    assert refused.value.code == "auth_failed"
    # The new password was dialled (once per AUTH mechanism tried), and only it.
    assert set(registry.smtp.recorder.auth_attempts[attempts:]) == {(LOGIN, "a wrong password")}
    after = await registry.load(added.id)
    assert after.label == "primary"
    assert open_password(registry.keyring, after) == PASSWORD
    assert (after.status, after.last_check_code) == (before.status, before.last_check_code)


async def test_every_check_takes_from_the_tenant_budget_before_dialling(
    sqlite_url: str, own_smtp: SmtpTestServer
) -> None:
    async for registry in registry_on(sqlite_url, own_smtp, burst=2):
        added = await registry.add()
        await registry.verify(added.id)
        connections = own_smtp.recorder.connections
        body = SmtpServerUpdate(password=SecretStr(PASSWORD))
        with pytest.raises(RateLimited):
            async with registry.sessions() as session, session.begin():
                await service.update_server(
                    session, registry.keyring, registry.checker, registry.tenant_id, added.id, body
                )
        assert own_smtp.recorder.connections == connections, "a refused check dials nothing"


def no_tokens() -> TokenKeeper:
    # Password servers never ask for a token: a keeper that fails loudly if one is asked for.
    return _NoTokens()  # type: ignore[return-value]


class _NoTokens:
    async def token(self, *_args: object) -> None:
        raise AssertionError("a password server asked for an OAuth token")
