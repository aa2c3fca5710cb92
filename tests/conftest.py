"""Fixtures with real parts: SQLite and PostgreSQL databases, SMTP servers with TLS and AUTH.

With CI=true a test that needs PostgreSQL or RabbitMQ fails when the service is down; elsewhere it
is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from fastapi import FastAPI

from services.app import create_app as create_all
from services.registry.main import create_app
from shared.crypto import generate_key
from shared.migrate import upgrade_database
from shared.settings import Settings
from tests.support.copies import copies_match
from tests.support.dovecot import DOVECOT, DovecotServer, dovecot_server
from tests.support.processes import delete_queues
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server

POSTGRES_URL = os.environ.get("ABL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("ABL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The queues of the apps that tests start without a prefix of their own (a registry alone
# publishes its events and changes to the machine's RabbitMQ): removed when the session ends,
# so that runs do not pile queues up in the broker they share.
SESSION_QUEUE_PREFIX = f"abl-session-{uuid.uuid4().hex[:8]}"

ACCOUNTS = {
    "alice@example.com": "alice-app-password",
    "bob@example.com": "bob-app-password",
    "carol@example.com": "carol-app-password",
}


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message}, and CI=true forbids skipping", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def session_queues_removed() -> Iterator[None]:
    yield
    settings = make_settings("sqlite://")
    with contextlib.suppress(OSError):  # no broker, no queues
        asyncio.run(delete_queues(settings.amqp_url.get_secret_value(), settings))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certificates(ca=ca, ca_file=str(ca_file))


@pytest.fixture(autouse=True)
def trust_test_ca(certs: Certificates, monkeypatch: pytest.MonkeyPatch) -> None:
    # The code under test uses the system trust store; SSL_CERT_FILE is how an operator
    # (and these tests) add an authority to it.
    monkeypatch.setenv("SSL_CERT_FILE", certs.ca_file)


@pytest.fixture(scope="session")
def starttls_server(certs: Certificates) -> Iterator[SmtpTestServer]:
    with smtp_server(certs, ACCOUNTS, security="starttls") as server:
        yield server


@pytest.fixture(scope="session")
def dovecot(certs: Certificates) -> Iterator[DovecotServer]:
    """A real IMAP server (Dovecot) with the same accounts as the SMTP test servers."""
    if not Path(DOVECOT).exists():
        pytest.fail(
            "dovecot is not installed: `make test` installs dovecot-imapd (as root), or run "
            "`apt-get install -y dovecot-imapd`",
            pytrace=False,
        )
    with dovecot_server(certs, ACCOUNTS) as server:
        yield server


@pytest.fixture(scope="session")
def tls_server(certs: Certificates) -> Iterator[SmtpTestServer]:
    with smtp_server(certs, ACCOUNTS, security="tls") as server:
        yield server


async def _pg_execute(url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"abl_test_{uuid.uuid4().hex[:12]}"
    base = POSTGRES_URL.rsplit("/", 1)[0]
    asyncio.run(_pg_execute(f"{base}/postgres", f'CREATE DATABASE "{name}"'))
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(
            _pg_execute(f"{base}/postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        )


@pytest.fixture(scope="session")
def migrated_postgres(postgres_server_url: str) -> str:
    upgrade_database(postgres_server_url)
    return postgres_server_url


async def truncate_postgres(url: str) -> None:
    """Empty every table but Alembic's. All of them: a table left out (the outboxes, the
    webhook tables were) carries one test's rows into the next, e.g. a pending delivery to an
    endpoint whose loopback port the next test's receiver happens to get."""
    await _pg_execute(
        url,
        "DO $$ BEGIN EXECUTE (SELECT 'TRUNCATE ' || string_agg(quote_ident(tablename), ', ') "
        "|| ' CASCADE' FROM pg_tables WHERE schemaname = 'public' "
        "AND tablename NOT LIKE 'alembic\\_version%'); END $$",
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of each kind the product supports."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'abl.db'}"
        upgrade_database(url)
        yield url
    else:
        url = request.getfixturevalue("migrated_postgres")
        asyncio.run(truncate_postgres(url))
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database alone, for tests whose subject does not depend on the
    database kind (input rules, address rules)."""
    url = f"sqlite:///{tmp_path / 'abl.db'}"
    upgrade_database(url)
    return url


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "database_url": database_url,
        "admin_token": secrets.token_urlsafe(32),
        "internal_token": secrets.token_urlsafe(32),
        "unsubscribe_key": secrets.token_urlsafe(32),
        "encryption_keys": generate_key(),
        "allow_private_hosts": True,
        "verify_timeout_seconds": 3.0,
        "verify_rate_per_minute": 600,
        "verify_burst": 100,
        "pacing": False,
        "queue_prefix": SESSION_QUEUE_PREFIX,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


class Api:
    """An HTTP client of one running app, with helpers for the common set-up steps."""

    def __init__(self, app: FastAPI, client: httpx.AsyncClient, settings: Settings) -> None:
        self.app = app
        self.client = client
        self.settings = settings

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token.get_secret_value()}"}

    def internal(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.internal_token.get_secret_value()}"}

    async def copies_caught_up(self) -> None:
        await copies_caught_up(self.app)

    async def new_tenant(self, name: str = "acme") -> dict[str, str]:
        response = await self.client.post("/v1/tenants", json={"name": name}, headers=self.admin())
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['api_key']}"}


async def copies_caught_up(app: FastAPI, seconds: float = 10.0) -> None:
    """Wait until the copies `app` keeps (the scheduler's, the webhooks service's) hold every
    change of the registry's tenants and servers (they travel by outbox and bus, a moment after
    the registry's answer): for a test that drives dispatch or the mailbox reader itself."""
    copies = getattr(app.state, "copies", {})
    if not copies:
        return
    deadline = asyncio.get_running_loop().time() + seconds
    while not await copies_match(app.state.sessions, copies):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the copies did not follow the registry in {seconds} s")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(
    settings: Settings, *, combined: bool = False, loops: bool = False
) -> AsyncIterator[Api]:
    """The registry app, or with `combined` every service in one app. Without `loops` the
    dispatch loop and the sender are left to the test, which calls `tick()` itself."""
    app = create_all(settings, run_loops=loops) if combined else create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
            yield Api(app, client, settings)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings) as value:
        yield value
