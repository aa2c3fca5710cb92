"""Faults in the stack as production runs it (registry, scheduler and senders as separate
processes on PostgreSQL and RabbitMQ): SIGTERM of a sender under load (every email sent once),
kill -9 of a sender with jobs in flight (none lost), and a scheduler killed between commit and
publish (none lost). The product's behaviour in this shape is in test_e2e.py."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.settings import Settings
from tests.conftest import AMQP_URL, make_settings, require_service, truncate_postgres
from tests.support.processes import (
    Service,
    add_smtp_servers,
    delete_queues,
    new_tenant,
    service_env,
    start,
)
from tests.support.proxy import CuttableProxy
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

LOGINS = {"a@example.com": "pa", "b@example.com": "pb", "c@example.com": "pc"}


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str]
    registry: Service
    scheduler: Service
    senders: list[Service]
    logs: Path

    def sender(self, name: str, **extra: str) -> Service:
        service = start(name, "sender", {**self.env, **extra}, self.logs)
        self.senders.append(service)
        return service


@contextmanager
def running_stack(
    database_url: str, amqp_url: str, certs: Certificates, logs: Path, **env: str
) -> Iterator[Stack]:
    """A registry and a scheduler as processes on their own queues (a sender per test);
    every process stopped and the queues removed afterwards."""
    asyncio.run(truncate_postgres(database_url))
    settings = make_settings(
        database_url, amqp_url=amqp_url, queue_prefix=f"abl-stack-{uuid.uuid4().hex[:8]}"
    )
    defaults = {
        "SSL_CERT_FILE": certs.ca_file,
        "ABL_TICK_SECONDS": "0.2",
        "ABL_PUBLISH_LEASE_SECONDS": "2",
    }
    environment = service_env(settings, **(defaults | env))
    registry = start("registry", "registry", environment, logs)
    # The scheduler's copy of the registry and its mailbox reader ask it.
    environment |= {"ABL_REGISTRY_URL": registry.url}
    scheduler = start("scheduler", "scheduler", environment, logs)
    environment |= {"ABL_SCHEDULER_URL": scheduler.url}
    running = Stack(settings, environment, registry, scheduler, [], logs)
    try:
        yield running
    finally:
        for service in [*running.senders, running.scheduler, registry]:
            service.stop()
        with suppress(OSError):  # a broker a fault test left stopped keeps its queues
            asyncio.run(delete_queues(amqp_url, settings))


@pytest.fixture
def stack(migrated_postgres: str, certs: Certificates, tmp_path: Path) -> Iterator[Stack]:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    with running_stack(migrated_postgres, AMQP_URL, certs, tmp_path) as value:
        yield value


async def warm_up(url: str, server_ids: list[str]) -> None:
    """Test set-up: make the servers warm (step 14, 500 a day) so the load is not capped."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.executemany(
            "INSERT INTO server_warmup (server_id, tenant_id, step, state_day, idle_days) "
            "SELECT id, tenant_id, 14, CURRENT_DATE, 0 FROM smtp_servers WHERE id = $1",
            [(uuid.UUID(server_id),) for server_id in server_ids],
        )
    finally:
        await connection.close()


def tenant_with_servers(
    stack: Stack, smtp: SmtpTestServer, *, warm: bool = False
) -> tuple[httpx.Client, dict[str, str]]:
    registry = httpx.Client(base_url=stack.registry.url, timeout=30)
    tenant = new_tenant(registry, stack.settings.admin_token.get_secret_value())
    servers = add_smtp_servers(registry, tenant, smtp.port, LOGINS)
    server_ids = [str(server["id"]) for server in servers]
    if warm:
        asyncio.run(warm_up(stack.settings.database_url, server_ids))
    return httpx.Client(base_url=stack.scheduler.url, timeout=30), tenant


def queue(client: httpx.Client, tenant: dict[str, str], count: int) -> list[str]:
    ids: list[str] = []
    for start_at in range(0, count, 500):
        batch = {
            "messages": [
                {"to": f"ok+{i}@example.org", "subject": f"s{i}", "text": "t"}
                for i in range(start_at, min(count, start_at + 500))
            ]
        }
        response = client.post("/v1/messages", json=batch, headers=tenant)
        assert response.status_code == 202, response.text
        ids += response.json()["ids"]
    return ids


def statuses(client: httpx.Client, tenant: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/messages", params=params, headers=tenant).json()
        for item in page["items"]:
            counts[item["status"]] = counts.get(item["status"], 0) + 1
        cursor = page["next_cursor"]
        if cursor is None:
            return counts


def wait_until(check: Any, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_sigterm_under_load_finishes_in_flight_and_loses_nothing(
    stack: Stack, certs: Certificates
) -> None:
    total = 150
    with smtp_server(certs, LOGINS, data_delay=0.05) as smtp:
        sender = stack.sender("sender-1", ABL_SENDER_PREFETCH="16")
        scheduler, tenant = tenant_with_servers(stack, smtp, warm=True)
        queue(scheduler, tenant, total)
        wait_until(lambda: sum(smtp.recorder.accepted.values()) >= 30)
        sender.signal(signal.SIGTERM)
        assert sender.wait(timeout=60) == 0
        stopped_at = sum(smtp.recorder.accepted.values())
        assert stopped_at < total, "the load was over before the SIGTERM: nothing was tested"
        stack.sender("sender-2")
        wait_until(lambda: statuses(scheduler, tenant) == {"sent": total}, seconds=120)
        assert sum(smtp.recorder.accepted.values()) == total, "an email was sent twice"


def test_kill_9_with_jobs_in_flight_loses_no_email(stack: Stack, certs: Certificates) -> None:
    total = 150
    prefetch = 16
    with smtp_server(certs, LOGINS, data_delay=0.05) as smtp:
        sender = stack.sender("sender-1", ABL_SENDER_PREFETCH=str(prefetch))
        scheduler, tenant = tenant_with_servers(stack, smtp, warm=True)
        queue(scheduler, tenant, total)
        wait_until(lambda: sum(smtp.recorder.accepted.values()) >= 30)
        sender.signal(signal.SIGKILL)
        sender.wait(timeout=10)
        stack.sender("sender-2")

        def settled() -> bool:
            counts = statuses(scheduler, tenant)
            return sum(counts.get(s, 0) for s in ("sent", "unknown")) == total

        wait_until(settled, seconds=120)
        accepted = sum(smtp.recorder.accepted.values())
        duplicates = accepted - total
        # Only transactions cut by the kill between the server's reply and the result event
        # can repeat; at most the jobs that were in flight.
        assert 0 <= duplicates <= prefetch
        print(f"kill -9: {duplicates} duplicate(s) among {total} emails")


async def unpublished(url: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM emails WHERE status = 'scheduled' AND published_at IS NULL"
        )
        return count
    finally:
        await connection.close()


def test_scheduler_killed_between_commit_and_publish_loses_nothing(
    stack: Stack, certs: Certificates
) -> None:
    """A scheduler whose broker connection is cut commits `scheduled` but gets no confirm; it is
    killed with -9 in that state. A new scheduler publishes the jobs again once their lease runs
    out, and every email leaves exactly once."""
    proxy = CuttableProxy(("127.0.0.1", 5672))
    try:
        stack.scheduler.stop()  # replaced by one that reaches the broker through the proxy
        through_proxy = stack.env | {"ABL_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/"}
        doomed = start("scheduler-doomed", "scheduler", through_proxy, stack.logs)
        with smtp_server(certs, LOGINS) as smtp:
            scheduler = httpx.Client(base_url=doomed.url, timeout=30)
            _, tenant = tenant_with_servers(stack, smtp)
            proxy.cut()
            queue(scheduler, tenant, 9)
            wait_until(lambda: statuses(scheduler, tenant) == {"scheduled": 9})
            time.sleep(1)
            # Committed, never confirmed: what a kill between commit and publish leaves.
            assert asyncio.run(unpublished(stack.settings.database_url)) == 9
            doomed.signal(signal.SIGKILL)
            doomed.wait(timeout=10)

            stack.scheduler = start("scheduler-2", "scheduler", stack.env, stack.logs)
            stack.env["ABL_SCHEDULER_URL"] = stack.scheduler.url
            stack.sender("sender-1")
            scheduler = httpx.Client(base_url=stack.scheduler.url, timeout=30)
            wait_until(lambda: statuses(scheduler, tenant) == {"sent": 9}, seconds=90)
            assert sum(smtp.recorder.accepted.values()) == 9
    finally:
        proxy.close()


def test_services_started_before_the_broker_and_the_database_wait_for_them(
    stack: Stack, certs: Certificates
) -> None:
    """A scheduler and a sender that start while RabbitMQ and PostgreSQL do not answer stay
    alive, say what they wait for, report not ready, and serve once both are back."""
    broker = CuttableProxy(("127.0.0.1", 5672))
    database = CuttableProxy(("127.0.0.1", 5432))
    broker.cut()
    database.cut()
    try:
        stack.scheduler.stop()
        url = stack.settings.database_url.replace(":5432/", f":{database.port}/")
        away = stack.env | {
            "ABL_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{broker.port}/",
            "ABL_DATABASE_URL": url,
        }
        scheduler = start(
            "scheduler-early",
            "scheduler",
            away,
            stack.logs,
            args=("--no-migrate",),
            wait_ready=False,
        )
        sender = start("sender-early", "sender", away, stack.logs, wait_ready=False)
        time.sleep(3)
        for service in (scheduler, sender):
            assert service.process.poll() is None, service.log.read_text()[-2000:]
            assert httpx.get(f"{service.url}/readyz", timeout=5).status_code == 503
        assert "waiting for RabbitMQ" in sender.log.read_text()
        assert "waiting for RabbitMQ" in scheduler.log.read_text()

        broker.restore()
        database.restore()
        wait_until(
            lambda: all(
                httpx.get(f"{s.url}/readyz", timeout=5).status_code == 200
                for s in (scheduler, sender)
            ),
            seconds=60,
        )
        stack.scheduler = scheduler
        stack.senders.append(sender)
        with smtp_server(certs, LOGINS) as smtp:
            client, tenant = tenant_with_servers(stack, smtp)
            client = httpx.Client(base_url=scheduler.url, timeout=30)
            queue(client, tenant, 3)
            wait_until(lambda: statuses(client, tenant) == {"sent": 3}, seconds=60)
            assert sum(smtp.recorder.accepted.values()) == 3
    finally:
        broker.close()
        database.close()


async def copy_rows(url: str, wipe: bool = False) -> tuple[int, int]:
    """(servers, tenants) in the scheduler's copy of the registry; `wipe` empties it first."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        if wipe:
            await connection.execute("DELETE FROM scheduler_servers; DELETE FROM scheduler_tenants")
        servers: int = await connection.fetchval("SELECT count(*) FROM scheduler_servers")
        tenants: int = await connection.fetchval("SELECT count(*) FROM scheduler_tenants")
        return servers, tenants
    finally:
        await connection.close()


def test_a_scheduler_whose_copy_is_lost_rebuilds_it_from_the_registry(
    stack: Stack, certs: Certificates
) -> None:
    """The scheduler's copy of the registry's tenants and servers is emptied while it is down:
    the new process reads the registry's snapshot routes over HTTP before it says ready, and
    sends through the same three servers."""
    with smtp_server(certs, LOGINS) as smtp:
        client, tenant = tenant_with_servers(stack, smtp)
        stack.sender("sender-1")
        queue(client, tenant, 3)
        wait_until(lambda: statuses(client, tenant) == {"sent": 3}, seconds=60)
        stack.scheduler.stop()
        assert asyncio.run(copy_rows(stack.settings.database_url, wipe=True)) == (0, 0)

        stack.scheduler = start("scheduler-2", "scheduler", stack.env, stack.logs)
        # Ready means rebuilt: nothing else has fed the copy since it was emptied.
        assert asyncio.run(copy_rows(stack.settings.database_url)) == (3, 1)
        client = httpx.Client(base_url=stack.scheduler.url, timeout=30)
        queue(client, tenant, 6)
        wait_until(lambda: statuses(client, tenant) == {"sent": 9}, seconds=60)
        assert sum(smtp.recorder.accepted.values()) == 9
        assert sorted(smtp.recorder.accepted.values()) == [3, 3, 3]
