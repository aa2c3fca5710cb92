"""The message bus: one interface, two shapes.

`RabbitBus` is what the stack runs on: `connect_robust`, durable quorum queues with a
dead-letter exchange and a delivery limit, persistent messages and publisher confirms.
`InProcessBus` is `make run`'s single process: the same publish/consume/ack semantics in memory.
Code above this module does not know which one it has.

Consumer policy, the same on both: the handler returns → ack; it raises
`TransientMessageError` (or anything unexpected) → the message goes back to the queue, and past the
delivery limit to the dead-letter queue; it raises `PermanentMessageError` → dead-lettered at once.
A message that waits in its queue longer than its `expires_in` is dead-lettered too (reason
`expired`), so nothing can sit in a queue unnoticed for ever.

The broker may be away: at start-up `RabbitBus` keeps trying to connect in the background (the
service answers /healthz meanwhile and /readyz says not ready); after a broker restart the robust
connection reopens the channels and, because each consumer's queue is declared on its own
channel, re-registers the consumers. `consuming()` tells whether a consumer really is registered
on an open channel, which is what readiness reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from shared.backoff import GaveUp, patiently
from shared.errors import PermanentMessageError
from shared.metrics import DEAD_LETTERED

logger = logging.getLogger("abl.broker")

EXCHANGE = "abl"
DEAD_LETTER_EXCHANGE = "abl.dlx"
DEFAULT_DELIVERY_LIMIT = 5
CONNECT_BACKOFF_MAX_SECONDS = 15.0
RECONNECT_INTERVAL_SECONDS = 1.0


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dead"


def parked_queue(queue: str) -> str:
    """Where a message that can never be handled is kept for an operator (no consumer)."""
    return f"{queue}.parked"


def queue_kind(queue: str) -> str:
    """`send-jobs`, `results` or `other`: a label of bounded cardinality, whatever the prefix."""
    for kind in ("send-jobs", "results"):
        if queue.endswith(f".{kind}") or queue.endswith(f".{kind}.dead") or queue == kind:
            return kind
    return "other"


class BrokerUnavailable(RuntimeError):
    """The broker did not answer in time; the caller keeps the message (lease, retry)."""


@dataclass(frozen=True)
class Delivery:
    body: bytes
    message_id: str | None
    delivery_count: int
    # The broker handed this message out before (to this or another consumer): whoever had it
    # may have acted on it, so the handler must check before doing anything it cannot repeat.
    redelivered: bool = False
    # Why a dead-lettered message left its queue: rejected, delivery_limit, expired.
    death_reason: str | None = None


Handler = Callable[[Delivery], Awaitable[None]]


class Bus(Protocol):
    async def declare(self, queue: str) -> None: ...

    async def publish(
        self, queue: str, body: bytes, *, message_id: str, expires_in: float | None = None
    ) -> None:
        """Return only once the bus has taken responsibility for the message."""

    async def park(self, queue: str, body: bytes, *, message_id: str | None) -> None:
        """Keep a message no consumer can handle in `<queue>.parked`, for an operator."""

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> None:
        """Start consuming; with the broker away, as soon as it answers."""

    def consuming(self, queue: str) -> bool:
        """A consumer of `queue` is registered on an open channel right now."""

    async def stop_consuming(self, queue: str) -> None:
        """Take no new deliveries from `queue`; those being handled may finish and be acked."""

    async def broadcast(self, topic: str, body: bytes, *, message_id: str) -> None:
        """Tell every current subscriber of `topic`; best effort (not kept across restarts)."""

    async def subscribe(self, topic: str, handler: Handler) -> None:
        """Receive what is broadcast on `topic` from now on (again after a reconnection)."""

    async def settle(self, seconds: float) -> None:
        """Before shutdown: let messages held only by this process reach their consumers."""

    async def depth(self, queue: str) -> int:
        """Messages waiting in `queue`."""

    async def close(self) -> None: ...


def _death_reason(headers: dict[str, Any]) -> str | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = deaths[0].get("reason")
        if isinstance(reason, bytes):
            return reason.decode(errors="replace")
        return str(reason) if reason is not None else None
    return None


@dataclass
class _Consumer:
    handler: Handler
    prefetch: int
    channel: AbstractChannel | None = None
    queue: AbstractQueue | None = None
    tag: str | None = None
    starting: asyncio.Task[None] | None = None


class RabbitBus:
    def __init__(
        self,
        url: str,
        *,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        wait_seconds: float = 30.0,
    ) -> None:
        self.url = url
        self.delivery_limit = delivery_limit
        # How long a publish or declare waits for an absent broker before giving up.
        self.wait_seconds = wait_seconds
        self.connection: AbstractRobustConnection | None = None
        self.publish_channel: AbstractChannel | None = None
        self.exchange: AbstractExchange | None = None
        self.consumers: dict[str, _Consumer] = {}
        self.subscribers: dict[str, Handler] = {}
        self.subscriber_channels: list[AbstractChannel] = []
        self.background: list[asyncio.Task[None]] = []
        self.declared: set[str] = set()
        self.connected = asyncio.Event()
        self._connector: asyncio.Task[None] | None = None
        self._closing = False

    # -- connection -----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background, retrying with backoff until the broker answers."""
        if self._connector is None:
            self._connector = asyncio.create_task(self._connect_until_done())

    async def connect(self) -> None:
        """Connect and wait until connected (tests, benchmarks, command-line tools)."""
        self.start()
        try:
            await asyncio.wait_for(self.connected.wait(), self.wait_seconds)
        except TimeoutError as exc:
            raise BrokerUnavailable("RabbitMQ did not answer") from exc

    async def _connect_until_done(self) -> None:
        with contextlib.suppress(GaveUp):  # closed before the broker ever answered
            await patiently(
                self._connect_once,
                retry_on=(Exception,),
                limit_seconds=None,
                what="RabbitMQ",
                logger=logger,
                stopping=lambda: self._closing,
                max_delay=CONNECT_BACKOFF_MAX_SECONDS,
            )
            logger.info("connected to RabbitMQ")
            self.connected.set()

    async def _connect_once(self) -> None:
        connection = await aio_pika.connect_robust(
            self.url,
            client_properties={"connection_name": "abl"},
            # Consumers must be back within seconds of the broker's return.
            reconnect_interval=RECONNECT_INTERVAL_SECONDS,
        )
        try:
            # on_return_raises: an unroutable message must fail the publish, not look delivered.
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.declare_exchange(
                EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
            await channel.declare_exchange(
                DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
            )
        except BaseException:
            await connection.close()
            raise
        self.connection = connection
        self.publish_channel = channel
        self.exchange = exchange

    async def _ready(self) -> None:
        self.start()
        if self.connected.is_set():
            return
        try:
            await asyncio.wait_for(self.connected.wait(), self.wait_seconds)
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"RabbitMQ not reachable for {self.wait_seconds:.0f} s"
            ) from exc

    # -- queues ---------------------------------------------------------------------------

    async def _declare_on(self, channel: AbstractChannel, queue: str) -> AbstractQueue:
        """Declare `queue` (and its dead-letter queue) on `channel`, which, being robust,
        declares them again, with their consumers, after a reconnection."""
        if queue.endswith(".dead"):
            # Consumed by the service that settles dead letters; it parks what it cannot
            # handle, so this queue needs no dead-letter queue of its own.
            return await channel.declare_queue(
                queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
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
        return live

    async def declare(self, queue: str) -> None:
        if queue in self.declared:
            return
        await self._ready()
        assert self.publish_channel is not None
        await self._declare_on(self.publish_channel, queue)
        self.declared.add(queue)

    async def publish(
        self, queue: str, body: bytes, *, message_id: str, expires_in: float | None = None
    ) -> None:
        await self.declare(queue)
        assert self.exchange is not None
        if not self.broker_up():
            # Known to be away (the robust connection is reconnecting): say so at once, so the
            # caller can take another way (the lease, a direct report) instead of waiting.
            raise BrokerUnavailable("the connection to RabbitMQ is down")
        message = aio_pika.Message(
            body,
            message_id=message_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=expires_in,
        )
        # With publisher confirms on, this returns once the broker has confirmed the message;
        # mandatory=True turns an unroutable message into an error instead of a silent drop.
        # While the broker is away the robust channel waits for it: bounded here, so that the
        # caller keeps the message (lease, retry) instead of hanging.
        # asyncio.timeout, not wait_for: wait_for wraps every publish in a task of its own,
        # which showed in the profile of a scheduler publishing thousands a second.
        try:
            async with asyncio.timeout(self.wait_seconds):
                await self.exchange.publish(message, routing_key=queue, mandatory=True)
        except TimeoutError as exc:
            raise BrokerUnavailable("publish not confirmed in time") from exc

    async def park(self, queue: str, body: bytes, *, message_id: str | None) -> None:
        """Keep a message no consumer can handle in `<queue>.parked`, for an operator."""
        await self._ready()
        assert self.publish_channel is not None
        name = parked_queue(queue)
        if name not in self.declared:
            await self.publish_channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            self.declared.add(name)
        await self.publish_channel.default_exchange.publish(
            aio_pika.Message(
                body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            ),
            routing_key=name,
            timeout=self.wait_seconds,
        )

    # -- consumers ------------------------------------------------------------------------

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> None:
        consumer = _Consumer(handler, prefetch)
        self.consumers[queue] = consumer
        if self.connected.is_set():
            await self._start_consumer(queue, consumer)
        else:
            consumer.starting = asyncio.create_task(self._start_when_connected(queue, consumer))

    async def _start_when_connected(self, queue: str, consumer: _Consumer) -> None:
        await self._when_connected(
            lambda: self._start_consumer(queue, consumer),
            what=f"RabbitMQ to consume {queue}",
            given_up=lambda: self.consumers.get(queue) is not consumer,
        )

    async def _when_connected(
        self,
        start: Callable[[], Awaitable[None]],
        *,
        what: str,
        given_up: Callable[[], bool] = lambda: False,
    ) -> None:
        """`start()` once connected, tried again with backoff until it works, the bus closes
        or the caller gives it up."""

        async def connected_then_start() -> None:
            await self._ready()
            await start()

        with contextlib.suppress(GaveUp):
            await patiently(
                connected_then_start,
                retry_on=(Exception,),
                limit_seconds=None,
                what=what,
                logger=logger,
                stopping=lambda: self._closing or given_up(),
                max_delay=CONNECT_BACKOFF_MAX_SECONDS,
            )

    async def _start_consumer(self, queue: str, consumer: _Consumer) -> None:
        assert self.connection is not None
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=consumer.prefetch)
        declared = await self._declare_on(channel, queue)
        handler = consumer.handler

        async def on_message(message: AbstractIncomingMessage) -> None:
            headers = message.headers or {}
            raw_count = headers.get("x-delivery-count", 0)
            count = (raw_count if isinstance(raw_count, int) else 0) + 1
            delivery = Delivery(
                message.body,
                message.message_id,
                count,
                redelivered=bool(message.redelivered) or count > 1,
                death_reason=_death_reason(headers),
            )
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

        consumer.tag = await declared.consume(on_message)
        consumer.channel = channel
        consumer.queue = declared

    async def broadcast(self, topic: str, body: bytes, *, message_id: str) -> None:
        await self._ready()
        assert self.publish_channel is not None
        if not self.broker_up():
            raise BrokerUnavailable("the connection to RabbitMQ is down")
        exchange = await self.publish_channel.declare_exchange(
            topic, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await asyncio.wait_for(
            exchange.publish(aio_pika.Message(body, message_id=message_id), routing_key=""),
            self.wait_seconds,
        )

    async def subscribe(self, topic: str, handler: Handler) -> None:
        self.subscribers[topic] = handler
        if self.connected.is_set():
            await self._start_subscriber(topic, handler)
        else:
            self.background.append(
                asyncio.create_task(
                    self._when_connected(
                        lambda: self._start_subscriber(topic, handler),
                        what=f"RabbitMQ to subscribe to {topic}",
                    )
                )
            )

    async def _start_subscriber(self, topic: str, handler: Handler) -> None:
        assert self.connection is not None
        channel = await self.connection.channel()
        exchange = await channel.declare_exchange(topic, aio_pika.ExchangeType.FANOUT, durable=True)
        # This process's own queue, gone with it; the robust channel declares and binds it
        # again after a reconnection (what was broadcast meanwhile is missed: best effort).
        queue = await channel.declare_queue(
            exclusive=True, auto_delete=True, arguments={"x-queue-type": "classic"}
        )
        await queue.bind(exchange)

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                await handler(Delivery(message.body, message.message_id, 1))
            except Exception as exc:
                logger.warning("broadcast on %s not handled: %s", topic, type(exc).__name__)

        await queue.consume(on_message, no_ack=True)
        self.subscriber_channels.append(channel)

    def broker_up(self) -> bool:
        """Connected to the broker right now (false while the robust connection reconnects)."""
        connection = self.connection
        return (
            connection is not None
            and not connection.is_closed
            and bool(getattr(connection, "connected", self.connected).is_set())
        )

    def consuming(self, queue: str) -> bool:
        consumer = self.consumers.get(queue)
        if consumer is None or consumer.channel is None or consumer.tag is None:
            return False
        if not self.broker_up():
            return False
        channel = consumer.channel
        if channel.is_closed:
            return False
        # The robust channel re-registers its consumers after a reconnection; until it has (or
        # if it failed to), the broker-side channel does not know the tag.
        underlay = getattr(channel, "_channel", None)
        registered = getattr(getattr(underlay, "channel", None), "consumers", None)
        return registered is None or consumer.tag in registered

    async def stop_consuming(self, queue: str) -> None:
        consumer = self.consumers.pop(queue, None)
        if consumer is None:
            return
        if consumer.starting is not None:
            consumer.starting.cancel()
        if consumer.queue is not None and consumer.tag is not None:
            with contextlib.suppress(Exception):
                await consumer.queue.cancel(consumer.tag)

    async def settle(self, seconds: float) -> None:
        """Nothing to do: the broker keeps every message across restarts."""

    async def depth(self, queue: str) -> int:
        await self.declare(queue)
        assert self.publish_channel is not None
        declared = await self.publish_channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)

    async def close(self) -> None:
        self._closing = True
        for consumer in self.consumers.values():
            if consumer.starting is not None:
                consumer.starting.cancel()
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        for task in self.background:
            task.cancel()
        channels = [c.channel for c in self.consumers.values()] + self.subscriber_channels
        for channel in channels:
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()
        if self.connection is not None:
            await self.connection.close()


@dataclass
class _Envelope:
    body: bytes
    message_id: str
    delivery_count: int = 0
    expires_at: float | None = None
    death_reason: str | None = None


@dataclass
class InProcessBus:
    """The bus of `make run`: in memory, at-least-once within the process."""

    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    queues: dict[str, asyncio.Queue[_Envelope]] = field(default_factory=dict)
    parked: dict[str, list[_Envelope]] = field(default_factory=dict)
    # Handlers running; each leaves the set when done (a list filtered per message cost
    # O(in flight) for every message).
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    consumer_loops: dict[str, list[asyncio.Task[None]]] = field(default_factory=dict)
    subscribers: dict[str, list[Handler]] = field(default_factory=dict)

    def _queue(self, name: str) -> asyncio.Queue[_Envelope]:
        return self.queues.setdefault(name, asyncio.Queue())

    async def declare(self, queue: str) -> None:
        self._queue(queue)
        if not queue.endswith(".dead"):
            self._queue(dead_letter_queue(queue))

    def dead_letters(self, queue: str) -> list[bytes]:
        """Bodies waiting in `queue`'s dead-letter queue (tests and tools)."""
        waiting = self._queue(dead_letter_queue(queue))
        return [envelope.body for envelope in list(waiting._queue)]  # type: ignore[attr-defined]

    def _dead_letter(self, queue: str, envelope: _Envelope, reason: str) -> None:
        DEAD_LETTERED.labels(queue_kind(queue)).inc()
        if queue.endswith(".dead"):
            self.parked.setdefault(parked_queue(queue), []).append(envelope)
            return
        self._queue(dead_letter_queue(queue)).put_nowait(
            _Envelope(envelope.body, envelope.message_id, death_reason=reason)
        )

    async def publish(
        self, queue: str, body: bytes, *, message_id: str, expires_in: float | None = None
    ) -> None:
        await self.declare(queue)
        expires_at = None if expires_in is None else time.monotonic() + expires_in
        self._queue(queue).put_nowait(_Envelope(body, message_id, expires_at=expires_at))

    async def park(self, queue: str, body: bytes, *, message_id: str | None) -> None:
        self.parked.setdefault(parked_queue(queue), []).append(_Envelope(body, message_id or ""))

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> None:
        await self.declare(queue)
        source = self._queue(queue)
        slots = asyncio.Semaphore(prefetch)

        async def handle(envelope: _Envelope) -> None:
            try:
                await handler(
                    Delivery(
                        envelope.body,
                        envelope.message_id,
                        envelope.delivery_count,
                        redelivered=envelope.delivery_count > 1,
                        death_reason=envelope.death_reason,
                    )
                )
            except PermanentMessageError as exc:
                logger.warning("dead-lettering a message from %s: %s", queue, exc)
                self._dead_letter(queue, envelope, "rejected")
            except Exception as exc:
                logger.warning(
                    "message from %s returned to the queue: %s", queue, type(exc).__name__
                )
                if envelope.delivery_count > self.delivery_limit:
                    self._dead_letter(queue, envelope, "delivery_limit")
                else:
                    source.put_nowait(envelope)
            finally:
                slots.release()

        async def loop() -> None:
            while True:
                await slots.acquire()
                envelope = await source.get()
                if envelope.expires_at is not None and envelope.expires_at < time.monotonic():
                    self._dead_letter(queue, envelope, "expired")
                    slots.release()
                    continue
                envelope.delivery_count += 1
                self._track(asyncio.create_task(handle(envelope)))

        self.consumer_loops.setdefault(queue, []).append(asyncio.create_task(loop()))

    def _track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def consuming(self, queue: str) -> bool:
        return any(not task.done() for task in self.consumer_loops.get(queue, []))

    async def broadcast(self, topic: str, body: bytes, *, message_id: str) -> None:
        async def tell(handler: Handler) -> None:
            await handler(Delivery(body, message_id, 1))

        for handler in self.subscribers.get(topic, []):
            self._track(asyncio.create_task(tell(handler)))

    async def subscribe(self, topic: str, handler: Handler) -> None:
        self.subscribers.setdefault(topic, []).append(handler)

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
        running = list(self.tasks)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        self.tasks.clear()
