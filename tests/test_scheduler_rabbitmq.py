"""The scheduler as its own service, on PostgreSQL and RabbitMQ: jobs are published with
confirms to the durable quorum queue, and the result events it consumes finish the emails."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import aio_pika
import httpx
import pytest

from services.scheduler.main import create_app as create_scheduler
from shared.broker import RabbitBus
from shared.messages import Outcome, ResultsReport, SendJob
from shared.settings import Settings
from tests.conftest import (
    AMQP_URL,
    copies_caught_up,
    make_settings,
    require_service,
    running,
    truncate_postgres,
)
from tests.support.processes import delete_queues
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, emails, result_for, warm_up

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]


@pytest.fixture
def stack_settings(migrated_postgres: str) -> Settings:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    asyncio.run(truncate_postgres(migrated_postgres))
    return make_settings(
        migrated_postgres, amqp_url=AMQP_URL, queue_prefix=f"abl-test-{uuid.uuid4().hex[:8]}"
    )


@pytest.fixture
async def amqp(stack_settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    # The queues as the services declare them (a sender may not have started yet).
    bus = RabbitBus(AMQP_URL)
    await bus.connect()
    for queue in (stack_settings.send_jobs_queue, stack_settings.results_queue):
        await bus.declare(queue)
    await bus.close()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    yield channel
    await connection.close()
    await delete_queues(AMQP_URL, stack_settings)


async def drain(channel: aio_pika.abc.AbstractChannel, queue: str) -> list[SendJob]:
    declared = await channel.get_queue(queue, ensure=False)
    jobs = []
    while (message := await declared.get(fail=False, timeout=5)) is not None:
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        jobs.append(SendJob.model_validate_json(message.body))
        await message.ack()
    return jobs


async def test_scheduler_service_publishes_to_rabbitmq_and_applies_results(
    stack_settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    starttls_server: SmtpTestServer,
) -> None:
    async with running(stack_settings) as registry:  # the registry service on its own
        tenant = await registry.new_tenant()
        servers = await add_servers(registry, tenant, starttls_server)
        await warm_up(registry, servers)

        scheduler_app = create_scheduler(stack_settings)
        async with scheduler_app.router.lifespan_context(scheduler_app):
            # The registry's changes wait in RabbitMQ for the scheduler's copy to take them.
            await copies_caught_up(scheduler_app)
            transport = httpx.ASGITransport(app=scheduler_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
                accepted = await client.post("/v1/messages", json=emails(30), headers=tenant)
                assert accepted.status_code == 202, accepted.text
                jobs: list[SendJob] = []
                for _ in range(100):  # the service's own loop dispatches
                    jobs += await drain(amqp, stack_settings.send_jobs_queue)
                    if len(jobs) >= 30:
                        break
                    await asyncio.sleep(0.1)
                assert sorted(Counter(job.server_id for job in jobs).values()) == [10, 10, 10]

                exchange = await amqp.get_exchange("abl")
                results = [result_for(job, Outcome.sent, data_completed=True) for job in jobs]
                # Ten as one message each (senders before batching), twenty in one report.
                bodies = [r.model_dump_json().encode() for r in results[:10]]
                bodies.append(ResultsReport(results=results[10:]).model_dump_json().encode())
                for body in bodies:
                    await exchange.publish(
                        aio_pika.Message(body), routing_key=stack_settings.results_queue
                    )
                for _ in range(100):
                    page = await client.get(
                        "/v1/messages", params={"status": "sent", "limit": 500}, headers=tenant
                    )
                    if len(page.json()["items"]) == 30:
                        break
                    await asyncio.sleep(0.1)
                assert len(page.json()["items"]) == 30
