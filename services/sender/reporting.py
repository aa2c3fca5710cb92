"""Results of finished jobs, published to the scheduler together.

One results message per email made the broker round trip (publish, confirm, deliver, ack) as
costly as the SMTP transaction it reports. Here what finishes while one message waits for its
confirm goes into the next: a busy sender publishes one message for many results, an idle one
waits for nobody (no timer, no added latency). Each caller returns only once the message holding
its result is confirmed, so a job is still acked only after its result is safe with the broker.
"""

from __future__ import annotations

import uuid

from shared.batching import Batches
from shared.broker import Bus
from shared.messages import ResultsReport, SendResult
from shared.metrics import RESULT_BATCH_SIZE

# Enough to amortise a round trip; small enough that one message stays well under a frame's
# usual size (a result is at most ~1.5 kB with its SMTP reply).
RESULTS_PER_MESSAGE = 100


class BatchedResults:
    def __init__(self, bus: Bus, queue: str, per_message: int = RESULTS_PER_MESSAGE) -> None:
        self.bus = bus
        self.queue = queue
        self.batches: Batches[SendResult, None] = Batches(self._publish, max_batch=per_message)

    async def publish(self, result: SendResult) -> None:
        """Return once the broker has confirmed a message holding `result`; raise what that
        message's publish raised (the caller then reports another way)."""
        await self.batches.submit(result)

    async def _publish(self, results: list[SendResult]) -> list[None]:
        body = ResultsReport(results=results).model_dump_json().encode()
        await self.bus.publish(self.queue, body, message_id=f"results:{uuid.uuid4()}")
        RESULT_BATCH_SIZE.observe(len(results))
        return [None] * len(results)
