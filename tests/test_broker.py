"""Both bus shapes keep the same promises: confirmed publish, ack on success, redelivery on a
transient failure, dead-lettering of a permanent one and past the delivery limit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from shared.broker import Bus, Delivery, InProcessBus, RabbitBus, dead_letter_queue
from shared.errors import PermanentMessageError, TransientMessageError
from shared.messages import SendJob, parse
from tests.conftest import AMQP_URL, require_service


@pytest.fixture(params=["in-process", "rabbitmq"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "in-process":
        value: Bus = InProcessBus(delivery_limit=2)
    else:
        require_service("RabbitMQ", "127.0.0.1", 5672)
        rabbit = RabbitBus(AMQP_URL, delivery_limit=2)
        await rabbit.connect()
        value = rabbit
    yield value
    await value.close()


async def dead_letters(bus: Bus, queue: str) -> list[bytes]:
    if isinstance(bus, InProcessBus):
        return bus.dead_letters(queue)
    connection = await aio_pika.connect(AMQP_URL)
    bodies = []
    async with connection:
        channel = await connection.channel()
        dead = await channel.get_queue(dead_letter_queue(queue), ensure=False)
        while (message := await dead.get(fail=False, timeout=5)) is not None:
            bodies.append(message.body)
            await message.ack()
        await channel.queue_delete(dead_letter_queue(queue))
        await channel.queue_delete(queue)
    return bodies


async def wait_for(condition: object, limit_seconds: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_seconds
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def test_publish_consume_retry_and_dead_letter(bus: Bus) -> None:
    queue = f"abl.test.{uuid.uuid4().hex[:8]}"
    handled: list[bytes] = []
    attempts: dict[bytes, int] = {}

    async def handler(delivery: Delivery) -> None:
        attempts[delivery.body] = attempts.get(delivery.body, 0) + 1
        if delivery.body == b"flaky" and attempts[delivery.body] == 1:
            raise TransientMessageError("try again")
        if delivery.body == b"poison":
            raise PermanentMessageError("never")
        if delivery.body == b"always-transient":
            raise TransientMessageError("still down")
        handled.append(delivery.body)

    for body in (b"ok", b"flaky", b"poison", b"always-transient"):
        await bus.publish(queue, body, message_id=body.decode())
    await bus.consume(queue, handler, prefetch=4)
    await wait_for(lambda: sorted(handled) == [b"flaky", b"ok"])
    await wait_for(lambda: attempts.get(b"always-transient", 0) >= 3)
    await asyncio.sleep(0.5)
    assert attempts[b"poison"] == 1
    assert attempts[b"flaky"] == 2
    # Past the delivery limit of 2 redeliveries the broker stops handing it out.
    assert attempts[b"always-transient"] == 3
    assert sorted(await dead_letters(bus, queue)) == [b"always-transient", b"poison"]


def test_unparsable_job_is_a_permanent_failure() -> None:
    with pytest.raises(PermanentMessageError):
        parse(SendJob, b'{"job_id": "nope"}')


async def test_a_broadcast_reaches_every_subscriber(bus: Bus) -> None:
    topic = f"abl.test.{uuid.uuid4().hex[:8]}.cancels"
    heard: dict[str, list[bytes]] = {"first": [], "second": []}
    for name in heard:

        async def handler(delivery: Delivery, name: str = name) -> None:
            heard[name].append(delivery.body)

        await bus.subscribe(topic, handler)
    await bus.broadcast(topic, b"job-1", message_id="job-1")
    await wait_for(lambda: heard == {"first": [b"job-1"], "second": [b"job-1"]})
    if isinstance(bus, RabbitBus):
        assert bus.publish_channel is not None
        await bus.publish_channel.exchange_delete(topic)
