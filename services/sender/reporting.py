"""Results of finished jobs, published to the scheduler together.

One results message per email made the broker round trip (publish, confirm, deliver, ack) as
costly as the SMTP transaction it reports. Here what finishes while one message waits for its
confirm goes into the next: a busy sender publishes one message for many results, an idle one
waits for nobody (no timer, no added latency). Each caller returns only once the message holding
its result is confirmed, so a job is still acked only after its result is safe with the broker.
"""

from __future__ import annotations

import asyncio
import uuid

from shared.broker import Bus
from shared.messages import ResultsReport, SendResult
from shared.metrics import RESULT_BATCH_SIZE

# Enough to amortise a round trip; small enough that one message stays well under a frame's
# usual size (a result is at most ~1.5 kB with its SMTP reply).
RESULTS_PER_MESSAGE = 100


class ResultNotPublished(Exception):
    """The publishing task stopped before the broker confirmed the message."""


class BatchedResults:
    def __init__(self, bus: Bus, queue: str, per_message: int = RESULTS_PER_MESSAGE) -> None:
        self.bus = bus
        self.queue = queue
        self.per_message = per_message
        self.waiting: list[tuple[SendResult, asyncio.Future[None]]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def publish(self, result: SendResult) -> None:
        """Return once the broker has confirmed a message holding `result`; raise what that
        message's publish raised (the caller then reports another way)."""
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((result, confirmed))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush())
        await confirmed

    async def _flush(self) -> None:
        while self.waiting:
            batch = self.waiting[: self.per_message]
            del self.waiting[: self.per_message]
            try:
                body = ResultsReport(results=[result for result, _ in batch]).model_dump_json()
                await self.bus.publish(
                    self.queue, body.encode(), message_id=f"results:{uuid.uuid4()}"
                )
            except BaseException as exc:
                # Whatever went wrong, each caller hears of it (and reports another way): a
                # caller left waiting would hold its job, unacked and unreported, for ever.
                stopped = not isinstance(exc, Exception)  # cancelled: nobody else will flush
                failed = batch + self.waiting if stopped else batch
                if stopped:
                    self.waiting = []
                for _, confirmed in failed:
                    if not confirmed.done():
                        confirmed.set_exception(ResultNotPublished("stopped") if stopped else exc)
                if stopped:
                    raise
                continue
            RESULT_BATCH_SIZE.observe(len(batch))
            for _, confirmed in batch:
                if not confirmed.done():
                    confirmed.set_result(None)
