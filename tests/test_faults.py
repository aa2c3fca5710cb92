"""No email left behind: the stack as separate processes on PostgreSQL and a RabbitMQ node of the
test's own, with the faults operators meet: a broker restart, a sender killed with jobs in
flight, a scheduler killed and restarted. Emails are counted at the SMTP server, by recipient:
none may be missing, every email must end final, and repeats stay within the jobs in flight."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI
from tests.support.processes import start
from tests.support.rabbit_node import RabbitNode, rabbitmq_installed
from tests.support.smtp import Certificates, SmtpTestServer, free_port, smtp_server
from tests.test_stack import (
    LOGINS,
    Stack,
    queue,
    running_stack,
    statuses,
    tenant_with_servers,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

FINAL = ("sent", "failed", "unknown", "canceled")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    if not rabbitmq_installed():
        message = "rabbitmq-server is not installed: the broker restart tests need their own node"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    broker = RabbitNode(tmp_path_factory.mktemp("rabbit"), free_port(), free_port())
    broker.start()
    try:
        yield broker
    finally:
        if broker.answers():
            broker.stop()


@pytest.fixture
def stack(
    migrated_postgres: str, certs: Certificates, tmp_path: Path, node: RabbitNode
) -> Iterator[Stack]:
    if not node.answers():
        node.start()
    with running_stack(
        migrated_postgres,
        node.url,
        certs,
        tmp_path,
        ABL_PUBLISH_LEASE_SECONDS="5",
        ABL_LOG_LEVEL="INFO",
    ) as value:
        yield value


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def deliveries(smtp: SmtpTestServer) -> Counter[str]:
    """How many times the SMTP server accepted each recipient (one recipient per email)."""
    with smtp.recorder.lock:
        return Counter(rcpt for envelope in smtp.recorder.messages for rcpt in envelope.rcpt_tos)


def repeats(smtp: SmtpTestServer) -> int:
    return sum(n - 1 for n in deliveries(smtp).values())


def accepted(smtp: SmtpTestServer) -> int:
    return sum(deliveries(smtp).values())


def restart_broker(node: RabbitNode, down_seconds: float = 5.0) -> float:
    node.stop()
    time.sleep(down_seconds)
    node.start()
    return time.monotonic()


def scheduler_client(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.scheduler.url, timeout=30)


def all_final(stack: Stack, tenant: dict[str, str], total: int) -> bool:
    counts = statuses(scheduler_client(stack), tenant)
    return sum(counts.get(state, 0) for state in FINAL) == total


def test_a_quiet_broker_restart_brings_every_consumer_back(
    stack: Stack, node: RabbitNode, certs: Certificates
) -> None:
    with smtp_server(certs, LOGINS) as smtp:
        sender = stack.sender("sender-1")
        scheduler, tenant = tenant_with_servers(stack, smtp)
        node.stop()
        wait_until(lambda: not ready(sender.url) and not ready(stack.scheduler.url), 30)
        time.sleep(5)
        node.start()
        back = time.monotonic()
        wait_until(lambda: ready(sender.url) and ready(stack.scheduler.url), 60)
        recovered = time.monotonic() - back
        print(f"broker restart: consumers back {recovered:.1f} s after the broker answered")
        assert recovered <= 10
        queue(scheduler, tenant, 10)
        wait_until(lambda: statuses(scheduler, tenant) == {"sent": 10}, 60)
        assert accepted(smtp) == 10


def test_three_faults_in_one_run_lose_no_email(
    stack: Stack, node: RabbitNode, certs: Certificates
) -> None:
    total = 1200
    prefetch = 16
    # Each reply takes 0.1 s, so the load lasts long enough for all three faults to strike it.
    with smtp_server(certs, LOGINS, data_delay=0.1) as smtp:
        first = stack.sender("sender-1", ABL_SENDER_PREFETCH=str(prefetch))
        second = stack.sender("sender-2", ABL_SENDER_PREFETCH=str(prefetch))
        scheduler, tenant = tenant_with_servers(stack, smtp, warm=True)
        queue(scheduler, tenant, total)
        figures: dict[str, float] = {}

        # 1. kill -9 of a sender with jobs in flight; a new one takes its place.
        wait_until(lambda: accepted(smtp) >= 150, 120)
        first.signal(signal.SIGKILL)
        first.wait(timeout=10)
        third = stack.sender("sender-3", ABL_SENDER_PREFETCH=str(prefetch))

        # 2. the broker stops, stays down 5 s, and starts again on the same data.
        wait_until(lambda: accepted(smtp) >= 450, 120)
        figures["sender kill"] = repeats(smtp)
        back = restart_broker(node)
        wait_until(lambda: all(ready(s.url) for s in (second, third, stack.scheduler)), seconds=60)
        figures["consuming again (s)"] = time.monotonic() - back
        # 3. kill -9 of the scheduler, restarted where the senders expect it.
        wait_until(lambda: accepted(smtp) >= 750, 120)
        figures["broker restart"] = repeats(smtp) - figures["sender kill"]
        port = stack.scheduler.port
        stack.scheduler.signal(signal.SIGKILL)
        stack.scheduler.wait(timeout=10)
        assert accepted(smtp) < total, "the load was over before the last fault: nothing tested"
        # Results of what the senders deliver meanwhile wait in their queue for the next one.
        time.sleep(2)
        stack.scheduler = start("scheduler-2", "scheduler", stack.env, stack.logs, port=port)

        wait_until(lambda: all_final(stack, tenant, total), seconds=300)
        figures["scheduler kill"] = (
            repeats(smtp) - figures["sender kill"] - figures["broker restart"]
        )
        counts = statuses(scheduler_client(stack), tenant)
        delivered = deliveries(smtp)
        lost = [f"ok+{i}@example.org" for i in range(total) if not delivered[f"ok+{i}@example.org"]]
        print(f"three faults, {total} emails: lost {len(lost)}, statuses {counts}, {figures}")
        assert counts.get("sent", 0) + counts.get("unknown", 0) == total
        assert lost == []
        # Repeats only for transactions in flight when a fault struck: the killed sender's
        # prefetch, and both senders' at the broker restart.
        assert repeats(smtp) <= prefetch + 2 * prefetch
        assert figures["consuming again (s)"] <= 10


async def dead_letter_depth(url: str, queue_name: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue_name, passive=True)
        return int(declared.declaration_result.message_count or 0)


def settled_dead_letters(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("abl_dead_letters_settled_total{")
    )


def test_a_scheduler_down_for_30_s_under_load_dead_letters_nothing(
    stack: Stack, certs: Certificates
) -> None:
    total = 300
    prefetch = 16
    with smtp_server(certs, LOGINS, data_delay=0.05) as smtp:
        first = stack.sender("sender-1", ABL_SENDER_PREFETCH=str(prefetch))
        second = stack.sender("sender-2", ABL_SENDER_PREFETCH=str(prefetch))
        scheduler, tenant = tenant_with_servers(stack, smtp, warm=True)
        queue(scheduler, tenant, total)
        wait_until(lambda: statuses(scheduler, tenant).get("queued", 0) == 0, 60)
        wait_until(lambda: accepted(smtp) >= 30, 60)
        port = stack.scheduler.port
        stack.scheduler.signal(signal.SIGKILL)
        stack.scheduler.wait(timeout=10)
        # With the scheduler away, a sender dies: its jobs come back redelivered, and whoever
        # gets them must ask the scheduler first. They wait; they are not dead-lettered.
        first.signal(signal.SIGKILL)
        first.wait(timeout=10)
        time.sleep(30)
        assert second.process.poll() is None
        stack.scheduler = start("scheduler-2", "scheduler", stack.env, stack.logs, port=port)
        wait_until(lambda: all_final(stack, tenant, total), seconds=180)
        assert statuses(scheduler_client(stack), tenant).get("sent", 0) == total
        assert [r for r, n in deliveries(smtp).items() if n == 0] == []
        assert repeats(smtp) <= prefetch
        dead = stack.settings.send_jobs_queue + ".dead"
        assert asyncio.run(dead_letter_depth(stack.settings.amqp_url.get_secret_value(), dead)) == 0
        assert settled_dead_letters(stack.scheduler.url) == 0


async def reject_one_job(url: str, queue_name: str) -> None:
    """Take one job from the queue as a broken consumer would and reject it: RabbitMQ itself
    dead-letters it."""
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.get_queue(queue_name, ensure=False)
        deadline = time.monotonic() + 30
        while (message := await declared.get(fail=False)) is None:
            assert time.monotonic() < deadline, "no job was published"
            await asyncio.sleep(0.1)
        await message.reject(requeue=False)


def test_jobs_dead_lettered_by_the_broker_are_retried_then_fail_with_the_reason(
    stack: Stack, certs: Certificates
) -> None:
    # No sender yet: the test plays a consumer that rejects the job, twice.
    stack.scheduler.stop()
    stack.env |= {"ABL_MAX_ATTEMPTS": "3", "ABL_RETRY_BASE_SECONDS": "0"}
    stack.scheduler = start("scheduler-2", "scheduler", stack.env, stack.logs)
    url = stack.settings.amqp_url.get_secret_value()
    with smtp_server(certs, LOGINS) as smtp:
        scheduler, tenant = tenant_with_servers(stack, smtp)
        (email_id,) = queue(scheduler, tenant, 1)

        def email() -> dict[str, object]:
            body: dict[str, object] = scheduler.get(
                f"/v1/messages/{email_id}", headers=tenant
            ).json()
            return body

        asyncio.run(reject_one_job(url, stack.settings.send_jobs_queue))
        wait_until(lambda: email()["attempts"] == 1 and email()["status"] != "failed", 30)
        stack.sender("sender-1")
        wait_until(lambda: email()["status"] == "sent", 60)
        assert accepted(smtp) == 1

        # Without a sender again, every attempt of the next email is rejected.
        stack.senders[-1].stop()
        (second,) = queue(scheduler, tenant, 1)
        for _ in range(3):
            asyncio.run(reject_one_job(url, stack.settings.send_jobs_queue))
        wait_until(
            lambda: (
                scheduler.get(f"/v1/messages/{second}", headers=tenant).json()["status"] == "failed"
            ),
            30,
        )
        final = scheduler.get(f"/v1/messages/{second}", headers=tenant).json()
        assert "dead-lettered (rejected)" in final["last_smtp_reply"]
        assert accepted(smtp) == 1
