"""Waiting for another service with exponential backoff, for a bounded time: the one way the
services wait for a dependency that does not answer (broker, database, registry, scheduler)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 15.0


class GaveUp(Exception):
    """The dependency stayed away past the bound (or the caller is stopping)."""


async def patiently(
    call: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    limit_seconds: float | None,
    what: str,
    logger: logging.Logger,
    stopping: Callable[[], bool] = lambda: False,
    on_wait: Callable[[], None] = lambda: None,
    max_delay: float = MAX_DELAY_SECONDS,
) -> T:
    """`call()`, tried again with backoff while it raises one of `retry_on`; `GaveUp` (chained
    to the last error) once `limit_seconds` would be passed or `stopping()` is true. With no
    limit it waits for as long as the caller lives: what a background connection does, where
    nobody is waiting on the other end to be told."""
    deadline = None if limit_seconds is None else time.monotonic() + limit_seconds
    delay = FIRST_DELAY_SECONDS
    while True:
        try:
            return await call()
        except retry_on as exc:
            over = deadline is not None and time.monotonic() + delay > deadline
            if stopping() or over:
                raise GaveUp(f"{what} unavailable: {type(exc).__name__}") from exc
            on_wait()
            # The name of the failure only: a broker or database error's text can hold its URL.
            logger.warning(
                "waiting for %s (%s); next try in %.1f s", what, type(exc).__name__, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
