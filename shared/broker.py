"""The message bus: one interface, two shapes.

`RabbitBus` is what the stack runs on: `connect_robust`, durable quorum queues with a
dead-letter exchange and a delivery limit, persistent messages and publisher confirms.
`InProcessBus` is `make run`'s single process: the same publish/consume/ack semantics in memory.
Code above this module does not know which one it has.

Consumer policy, the same on both: the handler returns → ack; it raises
`TransientMessageError` (or anything unexpected) → the message goes back to the queue, and past the
delivery limit to the dead-letter queue; it raises `PermanentMessageError` → dead-lettered at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from shared.errors import PermanentMessageError
from shared.metrics import DEAD_LETTERED

logger = logging.getLogger("abl.broker")

EXCHANGE = "abl"
DEAD_LETTER_EXCHANGE = "abl.dlx"
DEFAULT_DELIVERY_LIMIT = 5


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dead"


def queue_kind(queue: str) -> str:
    """`send-jobs`, `results` or `other`: a label of bounded cardinality, whatever the prefix."""
    kind = queue.rsplit(".", 1)[-1]
    return kind if kind in ("send-jobs", "results") else "other"


@dataclass(frozen=True)
class Delivery:
    body: bytes
    message_id: str | None
    delivery_count: int


Handler = Callable[[Delivery], Awaitable[None]]


class Bus(Protocol):
    async def declare(self, queue: str) -> None: ...

    async def publish(self, queue: str, body: bytes, *, message_id: str) -> None:
        """Return only once the bus has taken responsibility for the message."""

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> None: ...

    async def stop_consuming(self, queue: str) -> None:
        """Take no new deliveries from `queue`; those being handled may finish and be acked."""

    async def settle(self, seconds: float) -> None:
        """Before shutdown: let messages held only by this process reach their consumers."""

    async def depth(self, queue: str) -> int:
        """Messages waiting in `queue`."""

    async def close(self) -> None: ...


class RabbitBus:
    def __init__(self, url: str, *, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> None:
        self.url = url
        self.delivery_limit = delivery_limit
        self.connection: AbstractRobustConnection | None = None
        self.publish_channel: AbstractChannel | None = None
        self.exchange: AbstractExchange | None = None
        self.consume_channels: list[AbstractChannel] = []
        self.consumers: list[tuple[str, AbstractQueue, str]] = []
        self.declared: set[str] = set()

    async def connect(self) -> None:
        self.connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": "abl"}
        )
        # on_return_raises: an unroutable message must fail the publish, not look delivered.
        self.publish_channel = await self.connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self.exchange = await self.publish_channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        await self.publish_channel.declare_exchange(
            DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )

    async def declare(self, queue: str) -> None:
        if queue in self.declared:
            return
        assert self.publish_channel is not None, "connect() first"
        channel = self.publish_channel
        dead = await channel.declare_queue(
            dead_letter_queue(queue), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(DEAD_LETTER_EXCHANGE, routing_key=queue)
        live = await channel.declare_queue(
            queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-dead-letter-routing-key": queue,
                "x-delivery-limit": self.delivery_limit,
            },
        )
        await live.bind(EXCHANGE, routing_key=queue)
        self.declared.add(queue)

    async def publish(self, queue: str, body: bytes, *, message_id: str) -> None:
        assert self.exchange is not None, "connect() first"
        await self.declare(queue)
        message = aio_pika.Message(
            body,
            message_id=message_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        # With publisher confirms on, this returns once the broker has confirmed the message;
        # mandatory=True turns an unroutable message into an error instead of a silent drop.
        await self.exchange.publish(message, routing_key=queue, mandatory=True, timeout=30)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> None:
        assert self.connection is not None, "connect() first"
        await self.declare(queue)
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self.consume_channels.append(channel)
        declared = await channel.get_queue(queue, ensure=False)

        async def on_message(message: AbstractIncomingMessage) -> None:
            raw_count = (message.headers or {}).get("x-delivery-count", 0)
            count = (raw_count if isinstance(raw_count, int) else 0) + 1
            delivery = Delivery(message.body, message.message_id, count)
            try:
                async with message.process(requeue=True, ignore_processed=True):
                    try:
                        await handler(delivery)
                    except PermanentMessageError as exc:
                        logger.warning("dead-lettering a message from %s: %s", queue, exc)
                        DEAD_LETTERED.labels(queue_kind(queue)).inc()
                        await message.reject(requeue=False)
            except Exception as exc:
                logger.warning(
                    "message from %s returned to the queue: %s", queue, type(exc).__name__
                )

        tag = await declared.consume(on_message)
        self.consumers.append((queue, declared, tag))

    async def settle(self, seconds: float) -> None:
        """Nothing to do: the broker keeps every message across restarts."""

    async def depth(self, queue: str) -> int:
        assert self.publish_channel is not None, "connect() first"
        await self.declare(queue)
        declared = await self.publish_channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)

    async def stop_consuming(self, queue: str) -> None:
        for name, declared, tag in self.consumers:
            if name == queue:
                await declared.cancel(tag)
        self.consumers = [entry for entry in self.consumers if entry[0] != queue]

    async def close(self) -> None:
        for channel in self.consume_channels:
            await channel.close()
        if self.connection is not None:
            await self.connection.close()


@dataclass
class _Envelope:
    body: bytes
    message_id: str
    delivery_count: int = 0


@dataclass
class InProcessBus:
    """The bus of `make run`: in memory, at-least-once within the process."""

    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    queues: dict[str, asyncio.Queue[_Envelope]] = field(default_factory=dict)
    dead_letters: dict[str, list[_Envelope]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    consumer_loops: dict[str, list[asyncio.Task[None]]] = field(default_factory=dict)

    def _queue(self, name: str) -> asyncio.Queue[_Envelope]:
        return self.queues.setdefault(name, asyncio.Queue())

    async def declare(self, queue: str) -> None:
        self._queue(queue)
        self.dead_letters.setdefault(dead_letter_queue(queue), [])

    async def publish(self, queue: str, body: bytes, *, message_id: str) -> None:
        await self.declare(queue)
        self._queue(queue).put_nowait(_Envelope(body, message_id))

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> None:
        await self.declare(queue)
        source = self._queue(queue)
        slots = asyncio.Semaphore(prefetch)

        async def handle(envelope: _Envelope) -> None:
            try:
                await handler(Delivery(envelope.body, envelope.message_id, envelope.delivery_count))
            except PermanentMessageError as exc:
                logger.warning("dead-lettering a message from %s: %s", queue, exc)
                DEAD_LETTERED.labels(queue_kind(queue)).inc()
                self.dead_letters[dead_letter_queue(queue)].append(envelope)
            except Exception as exc:
                logger.warning(
                    "message from %s returned to the queue: %s", queue, type(exc).__name__
                )
                if envelope.delivery_count > self.delivery_limit:
                    DEAD_LETTERED.labels(queue_kind(queue)).inc()
                    self.dead_letters[dead_letter_queue(queue)].append(envelope)
                else:
                    source.put_nowait(envelope)
            finally:
                slots.release()

        async def loop() -> None:
            while True:
                await slots.acquire()
                envelope = await source.get()
                envelope.delivery_count += 1
                self.tasks.append(asyncio.create_task(handle(envelope)))
                self.tasks = [task for task in self.tasks if not task.done()]

        self.consumer_loops.setdefault(queue, []).append(asyncio.create_task(loop()))

    async def depth(self, queue: str) -> int:
        return self._queue(queue).qsize()

    async def settle(self, seconds: float) -> None:
        """Wait (at most `seconds`) until every queue with a consumer is empty and handled:
        a message left in memory would be lost with the process."""
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            busy = [task for task in self.tasks if not task.done()]
            waiting = any(
                not self.queues[name].empty()
                for name, loops in self.consumer_loops.items()
                if loops
            )
            if not busy and not waiting:
                return
            await asyncio.sleep(0.01)
        logger.warning("in-process bus still busy after %.0f s", seconds)

    async def stop_consuming(self, queue: str) -> None:
        loops = self.consumer_loops.pop(queue, [])
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    async def close(self) -> None:
        for queue in list(self.consumer_loops):
            await self.stop_consuming(queue)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
