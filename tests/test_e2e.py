"""End to end, in both shapes: `single` (one process, SQLite, in-process bus) and `stack`
(registry, scheduler, two senders and the gateway as separate processes on PostgreSQL and
RabbitMQ). Every check is made at the SMTP server and through the public API."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from shared.db import create_engine
from shared.settings import Settings
from tests.conftest import AMQP_URL, make_settings, require_service, truncate_postgres
from tests.support.processes import Service, delete_queues, service_env, start
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server


@dataclass
class Deployment:
    mode: str
    settings: Settings
    env: dict[str, str]
    logs: Path
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.services["all" if self.mode == "single" else "gateway"].url

    def up(self) -> None:
        if self.mode == "single":
            self.services["all"] = start("all", "all", self.env, self.logs)
            return
        registry = start("registry", "registry", self.env, self.logs)
        # The scheduler's copy of the registry and its mailbox reader ask the registry.
        scheduler = start(
            "scheduler", "scheduler", self.env | {"ABL_REGISTRY_URL": registry.url}, self.logs
        )
        urls = {"ABL_REGISTRY_URL": registry.url, "ABL_SCHEDULER_URL": scheduler.url}
        self.services = {"registry": registry, "scheduler": scheduler}
        for name in ("sender-1", "sender-2"):
            self.services[name] = start(name, "sender", self.env | urls, self.logs)
        self.services["gateway"] = start("gateway", "gateway", self.env | urls, self.logs)

    def down(self) -> None:
        # Senders first, as Kubernetes would drain them; each must exit cleanly.
        order = sorted(self.services.values(), key=lambda s: not s.name.startswith("sender"))
        for service in order:
            service.signal(signal.SIGTERM)
            assert service.wait(timeout=60) == 0, f"{service.name} did not stop cleanly"
        self.services = {}

    def kill(self) -> None:
        for service in self.services.values():
            service.stop()


@pytest.fixture(scope="module", params=["single", "stack"])
def deployment(
    request: pytest.FixtureRequest, certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp(f"e2e-{request.param}")
    if request.param == "single":
        settings = make_settings(f"sqlite:///{logs / 'abl.db'}")
    else:
        require_service("RabbitMQ", "127.0.0.1", 5672)
        url = request.getfixturevalue("migrated_postgres")
        asyncio.run(truncate_postgres(url))
        settings = make_settings(
            url, amqp_url=AMQP_URL, queue_prefix=f"abl-e2e-{uuid.uuid4().hex[:8]}"
        )
    env = service_env(
        settings,
        SSL_CERT_FILE=certs.ca_file,
        ABL_TICK_SECONDS="0.2",
        ABL_RETRY_BASE_SECONDS="0",
        ABL_RETRY_CAP_SECONDS="0",
        ABL_SENDER_PREFETCH="16",
    )
    running = Deployment(request.param, settings, env, logs)
    running.up()
    try:
        yield running
    finally:
        running.kill()
        if request.param == "stack":
            asyncio.run(delete_queues(AMQP_URL, settings))


class Client:
    def __init__(self, deployment: Deployment, key: str) -> None:
        self.deployment = deployment
        self.headers = {"Authorization": f"Bearer {key}"}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.deployment.url}{path}", headers=self.headers, timeout=30, **kwargs
        )

    def add_server(self, smtp: SmtpTestServer, login: str) -> str:
        response = self.request(
            "POST",
            "/v1/servers",
            json={
                "host": "localhost",
                "port": smtp.port,
                "security": "starttls",
                "username": login,
                "password": smtp.recorder.accounts[login],
                "from_email": login,
            },
        )
        assert response.status_code == 201, response.text
        server_id: str = response.json()["id"]
        return server_id

    def queue(self, count: int, prefix: str = "ok") -> list[str]:
        batch = {
            "messages": [
                {"to": f"{prefix}+{i}@example.org", "subject": f"s{i}", "text": "t"}
                for i in range(count)
            ]
        }
        response = self.request("POST", "/v1/messages", json=batch)
        assert response.status_code == 202, response.text
        ids: list[str] = response.json()["ids"]
        return ids

    def by_status(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 500} | ({"cursor": cursor} if cursor else {})
            page = self.request("GET", "/v1/messages", params=params).json()
            for item in page["items"]:
                found.setdefault(item["status"], []).append(item["id"])
            cursor = page["next_cursor"]
            if cursor is None:
                return found


def tenant(deployment: Deployment, name: str = "acme") -> Client:
    admin = {"Authorization": f"Bearer {deployment.settings.admin_token.get_secret_value()}"}
    response = httpx.post(
        f"{deployment.url}/v1/tenants", json={"name": name}, headers=admin, timeout=30
    )
    assert response.status_code == 201, response.text
    return Client(deployment, response.json()["api_key"])


def warm_all(deployment: Deployment) -> None:
    """Test set-up: every server without a warmup row starts warm (500 a day)."""

    async def run() -> None:
        engine = create_engine(deployment.settings.database_url)
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO server_warmup (server_id, tenant_id, step, state_day, "
                    "idle_days) SELECT id, tenant_id, 14, :day, 0 FROM smtp_servers "
                    "WHERE id NOT IN (SELECT server_id FROM server_warmup)"
                ),
                {"day": date.today()},
            )
        await engine.dispose()

    asyncio.run(run())


def wait_until(check: Any, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


ACCOUNTS = {f"{name}@example.com": f"{name}-pw" for name in ("a1", "a2", "a3", "b1")}


@pytest.fixture
def smtp(certs: Certificates) -> Iterator[SmtpTestServer]:
    with smtp_server(certs, ACCOUNTS) as server:
        yield server


def test_3_servers_30_emails_10_accepted_by_each_account(
    deployment: Deployment, smtp: SmtpTestServer
) -> None:
    client = tenant(deployment)
    for login in ("a1@example.com", "a2@example.com", "a3@example.com"):
        client.add_server(smtp, login)
    client.queue(30)
    wait_until(lambda: len(client.by_status().get("sent", [])) == 30)
    assert dict(smtp.recorder.accepted) == {
        "a1@example.com": 10,
        "a2@example.com": 10,
        "a3@example.com": 10,
    }


def test_3_fresh_servers_100_emails_20_each_today_40_queued(
    deployment: Deployment, smtp: SmtpTestServer
) -> None:
    client = tenant(deployment)
    for login in ("a1@example.com", "a2@example.com", "a3@example.com"):
        client.add_server(smtp, login)
    ids = client.queue(100)
    wait_until(lambda: len(client.by_status().get("sent", [])) == 60)
    time.sleep(1)  # several ticks: nothing more leaves today
    statuses = client.by_status()
    assert len(statuses["sent"]) == 60
    assert statuses["queued"] == ids[60:]
    assert dict(smtp.recorder.accepted) == {
        "a1@example.com": 20,
        "a2@example.com": 20,
        "a3@example.com": 20,
    }


def test_a_server_whose_password_stops_working(
    deployment: Deployment, smtp: SmtpTestServer
) -> None:
    client = tenant(deployment)
    broken = client.add_server(smtp, "a1@example.com")
    client.add_server(smtp, "a2@example.com")
    smtp.recorder.accounts["a1@example.com"] = "changed-at-the-provider"
    client.queue(10)
    wait_until(lambda: len(client.by_status().get("sent", [])) == 10)
    assert dict(smtp.recorder.accepted) == {"a2@example.com": 10}
    assert client.request("GET", f"/v1/servers/{broken}").json()["status"] == "auth_failed"


def test_two_tenants_never_share_servers(deployment: Deployment, smtp: SmtpTestServer) -> None:
    first, second = tenant(deployment, "first"), tenant(deployment, "second")
    for login in ("a1@example.com", "a2@example.com", "a3@example.com"):
        first.add_server(smtp, login)
    second.add_server(smtp, "b1@example.com")
    first.queue(12, prefix="ok-first")
    second.queue(5, prefix="ok-second")
    wait_until(lambda: sum(smtp.recorder.accepted.values()) == 17)
    for envelope in smtp.recorder.messages:
        owner = "second" if envelope.rcpt_tos[0].startswith("ok-second") else "first"
        sender = envelope.mail_from
        assert (sender == "b1@example.com") == (owner == "second"), (sender, owner)


def test_bad_input_is_problem_json_and_nothing_is_queued(deployment: Deployment) -> None:
    client = tenant(deployment)
    batch = {
        "messages": [
            {"to": "fine@example.org", "subject": "s", "text": "t"},
            {"to": "not an address", "subject": "s", "text": "t"},
        ]
    }
    response = client.request("POST", "/v1/messages", json=batch)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["field"] == "body.messages.1.to"
    assert client.by_status() == {}
    bad_server = client.request("POST", "/v1/servers", json={"preset": "gmail"})
    assert bad_server.status_code == 422
    assert bad_server.json()["code"] == "validation_failed"


def test_a_restart_mid_run_loses_nothing_and_sends_nothing_twice(
    deployment: Deployment, certs: Certificates
) -> None:
    total = 500
    with smtp_server(certs, ACCOUNTS, data_delay=0.1) as slow:
        client = tenant(deployment)
        for login in ("a1@example.com", "a2@example.com", "a3@example.com"):
            client.add_server(slow, login)
        warm_all(deployment)
        client.queue(total)
        wait_until(lambda: sum(slow.recorder.accepted.values()) >= 20)
        deployment.down()
        assert sum(slow.recorder.accepted.values()) < total, "finished before the restart"
        deployment.up()
        wait_until(lambda: len(client.by_status().get("sent", [])) == total, seconds=120)
        assert sum(slow.recorder.accepted.values()) == total
