"""Webhooks with the product as real processes: the one-process app killed with SIGKILL and
started again while events wait to be delivered (none lost), and the stack (registry,
scheduler, sender and webhooks as separate processes on PostgreSQL and RabbitMQ) delivering
every `email.sent` to a receiver on loopback that verifies each signature."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from shared.migrate import upgrade_database
from tests.conftest import AMQP_URL, make_settings, require_service
from tests.support.processes import Service, add_smtp_servers, new_tenant, service_env, start
from tests.support.receiver import Receiver, receiver
from tests.support.smtp import Certificates, smtp_server
from tests.test_stack import LOGINS, Stack, queue, running_stack, tenant_with_servers, wait_until

# Short retries and polls, so that a test waits seconds, not the production minutes.
FAST_WEBHOOKS = {
    "ABL_TICK_SECONDS": "0.1",
    "ABL_OUTBOX_POLL_SECONDS": "0.2",
    "ABL_WEBHOOK_TICK_SECONDS": "0.1",
    "ABL_WEBHOOK_RETRY_BASE_SECONDS": "0.1",
    "ABL_WEBHOOK_RETRY_CAP_SECONDS": "0.5",
    "ABL_WEBHOOK_LEASE_SECONDS": "2",
}


@pytest.fixture
def hook() -> Iterator[Receiver]:
    with receiver() as state:
        yield state


def register(client: httpx.Client, tenant: dict[str, str], hook: Receiver, *types: str) -> None:
    response = client.post(
        "/v1/webhooks", json={"url": hook.url, "event_types": list(types)}, headers=tenant
    )
    assert response.status_code == 201, response.text
    hook.secret = response.json()["secret"]


def sent_ids(hook: Receiver) -> Counter[str]:
    """How many times each email's `email.sent` was accepted (by email id)."""
    return Counter(r.data["email_id"] for r in hook.of_type("email.sent"))


def switch(after: int, first: int, then: int) -> tuple[Callable[[], int], threading.Event]:
    """An answer that is `first` for the first `after` requests, then `then` until the event
    is set (the restart), then 200."""
    calls = {"n": 0}
    restarted = threading.Event()

    def answer() -> int:
        calls["n"] += 1
        if restarted.is_set():
            return 200
        return first if calls["n"] <= after else then

    return answer, restarted


def test_the_product_killed_and_restarted_mid_run_loses_no_event(
    certs: Certificates, tmp_path: Path, hook: Receiver
) -> None:
    url = f"sqlite:///{tmp_path / 'abl.db'}"
    upgrade_database(url)
    env = service_env(make_settings(url), SSL_CERT_FILE=certs.ca_file, **FAST_WEBHOOKS)
    # Five events go through, then every attempt fails until the restart; the SMTP server is
    # slow, so at the kill emails are in flight too, and events wait in the outbox, in the
    # bus, in the deliveries table and in flight.
    hook.answer, restarted = switch(5, 200, 500)
    with smtp_server(certs, LOGINS, data_delay=0.3) as smtp:
        product = start("all", "all", env, tmp_path)
        try:
            client = httpx.Client(base_url=product.url, timeout=30)
            tenant = new_tenant(client, env["ABL_ADMIN_TOKEN"])
            add_smtp_servers(client, tenant, smtp.port, LOGINS)
            register(client, tenant, hook, "email.sent", "email.failed", "email.unknown")
            ids = queue(client, tenant, 30)
            wait_until(lambda: hook.answered[500] >= 3)
            product.signal(signal.SIGKILL)
            product.wait(timeout=10)
            at_kill = sum(smtp.recorder.accepted.values())
            accepted_at_kill = len(hook.accepted)
            restarted.set()
            product = start("all", "all", env, tmp_path, port=product.port)
            wait_until(lambda: set(sent_ids(hook)) >= set(ids), seconds=120)
            time.sleep(1.0)  # time for a late repeat, to be counted
        finally:
            product.stop()
    counts = sent_ids(hook)
    assert set(counts) == set(ids), "an email.sent event was lost"
    assert hook.bad_signatures == 0
    assert not hook.of_type("email.failed")
    assert not hook.of_type("email.unknown")
    # Repeats keep their webhook-id: one id per email, however often it arrived.
    by_email: dict[str, set[str]] = {}
    for r in hook.of_type("email.sent"):
        by_email.setdefault(r.data["email_id"], set()).add(r.id)
    assert all(len(hook_ids) == 1 for hook_ids in by_email.values())
    print(
        f"restart: {at_kill}/30 emails and {accepted_at_kill} events accepted at the kill; "
        f"{sum(counts.values()) - 30} repeated event(s) after it"
    )
    assert at_kill < 30, "every email had left before the kill: it tested less than it says"


@pytest.fixture
def stack(migrated_postgres: str, certs: Certificates, tmp_path: Path) -> Iterator[Stack]:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    with running_stack(migrated_postgres, AMQP_URL, certs, tmp_path, **FAST_WEBHOOKS) as value:
        yield value


def test_the_stack_delivers_every_email_sent_once_with_a_valid_signature(
    stack: Stack, certs: Certificates, hook: Receiver
) -> None:
    webhooks: Service = start("webhooks", "webhooks", stack.env, stack.logs)
    stack.senders.append(webhooks)  # stopped with the stack's processes
    with smtp_server(certs, LOGINS) as smtp:
        stack.sender("sender-1")
        scheduler, tenant = tenant_with_servers(stack, smtp, warm=True)
        register(httpx.Client(base_url=webhooks.url, timeout=30), tenant, hook, "email.sent")
        ids = queue(scheduler, tenant, 30)
        wait_until(lambda: len(hook.of_type("email.sent")) >= 30, seconds=120)
        time.sleep(1.0)  # time for a repeat, were there one
    sent = hook.of_type("email.sent")
    assert sorted(r.data["email_id"] for r in sent) == sorted(ids)  # each once
    assert len({r.id for r in sent}) == 30
    servers = httpx.get(f"{stack.registry.url}/v1/servers", headers=tenant).json()["items"]
    assert {r.data["server_id"] for r in sent} == {s["id"] for s in servers}
    assert hook.bad_signatures == 0
    assert hook.answered == Counter({200: 30})
