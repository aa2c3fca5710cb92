"""Many callers, one round trip: what is asked while a batch is in flight goes in the next.

The pattern behind every batch the services make of single requests (the senders' results and
"still sendable?" questions, the scheduler's result transactions): no timer is needed for
batches to form under load, since callers pile up while the previous round trip lasts, and a
lone caller waits only for its own. `linger` adds a wait before the first batch, for callers
known to arrive in bursts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class BatchStopped(Exception):
    """The task sending the batches was cancelled before this caller's batch was answered."""


class Batches(Generic[Item, Answer]):
    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[list[Answer]]],
        *,
        max_batch: int,
        linger: float = 0.0,
    ) -> None:
        """`send` takes a batch and answers each item, in order, or raises for all of them."""
        self.send = send
        self.max_batch = max_batch
        self.linger = linger
        self.waiting: list[tuple[Item, asyncio.Future[Answer]]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Answer:
        """`item`'s answer, once its batch was sent; what `send` raised for its batch."""
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.waiting.append((item, answer))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush())
        return await answer

    async def close(self) -> None:
        """Wait for the batches under way."""
        if self.flusher is not None:
            await asyncio.gather(self.flusher, return_exceptions=True)

    async def _flush(self) -> None:
        if self.linger:
            await asyncio.sleep(self.linger)
        while self.waiting:
            batch = self.waiting[: self.max_batch]
            del self.waiting[: self.max_batch]
            try:
                answers = await self.send([item for item, _ in batch])
                if len(answers) != len(batch):
                    raise ValueError(f"{len(answers)} answers to a batch of {len(batch)}")
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
            except Exception as exc:
                _fail(batch, exc)
                continue
            except BaseException:
                # Cancelled: nobody else sends these, and a caller left waiting would hold
                # its work (a job unacked, a message unapplied) for ever.
                _fail(batch + self.waiting, BatchStopped("stopped before the batch was answered"))
                self.waiting = []
                raise
            await asyncio.sleep(0)  # let the callers already scheduled join the next batch


def _fail(batch: list[tuple[Item, asyncio.Future[Answer]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
