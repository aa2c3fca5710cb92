"""Per-minute provider limits held by the sender itself (Microsoft 365: 30 messages a minute):
the rule as a table and a hypothesis property, then a burst of jobs through a real SMTP server
whose arrival times are counted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.sender.delivery import Deliverer, MinuteLimit
from services.sender.domain import minute_wait
from shared.messages import EmailContent, Outcome, SendJob, SmtpCredentials
from shared.timeutil import utcnow
from tests.conftest import ACCOUNTS, make_settings
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server


@pytest.mark.parametrize(
    ("ends", "in_flight", "now", "limit", "expected"),
    [
        ([], 0, 100.0, 30, 0.0),
        ([50.0] * 29, 0, 100.0, 30, 0.0),  # 29 in the last minute: one more may start
        ([50.0] * 30, 0, 100.0, 30, 10.0),  # the 30 leave the window at 110
        ([40.0] * 30, 0, 100.0, 30, 0.0),  # exactly 60 s ago: out of the window
        ([45.0, 50.0, 55.0], 0, 100.0, 3, 5.0),  # the oldest leaves at 105
        ([45.0, 50.0, 55.0], 1, 100.0, 3, 10.0),  # one in flight: the second oldest must go
        ([45.0], 3, 100.0, 3, None),  # all slots in flight: wait for one to end
        ([], 3, 100.0, 3, None),
        ([], 2, 100.0, 3, 0.0),
    ],
)
def test_minute_wait_table(
    ends: list[float], in_flight: int, now: float, limit: int, expected: float | None
) -> None:
    assert minute_wait(ends, in_flight, now, limit) == expected


@given(
    durations=st.lists(st.floats(0, 5), min_size=1, max_size=80),
    gaps=st.lists(st.floats(0, 3), min_size=80, max_size=80),
    limit=st.integers(1, 10),
    concurrency=st.integers(1, 4),
)
def test_no_period_ever_sees_more_than_the_limit(
    durations: list[float], gaps: list[float], limit: int, concurrency: int
) -> None:
    """A simulation: jobs arrive (in bursts or not), up to `concurrency` transactions run at
    once, each starts when `minute_wait` says so. Every message reaches the server between
    its start and its end; no instant lies in more than `limit` of the spans [start, end +
    period), so no 60 seconds hold more than `limit` of them."""
    period = 60.0
    arrivals = [sum(gaps[: i + 1]) for i in range(len(durations))]
    running: list[float] = []  # end times of transactions in flight
    ended: list[float] = []
    spans: list[tuple[float, float]] = []
    now = 0.0
    for arrival, duration in zip(arrivals, durations, strict=False):
        now = max(now, arrival)
        while True:
            finished = sorted(e for e in running if e <= now)
            for end in finished:
                running.remove(end)
                ended.append(end)
            if len(running) >= concurrency:
                now = min(running)
                continue
            wait = minute_wait(sorted(ended), len(running), now, limit, period)
            if wait == 0.0:
                break
            now = min(running) if wait is None else now + wait
        running.append(now + duration)
        spans.append((now, now + duration))
    # A message reaches the server between its start and its end, so if `limit + 1` arrived
    # within one period, all their [start, end + period) spans would hold the last arrival.
    for start, _ in spans:
        holding = [s for s, e in spans if s <= start < e + period - 1e-6]
        assert len(holding) <= limit


def job(to: str) -> SendJob:
    return SendJob(
        job_id=uuid.uuid4(),
        email_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        server_id=SERVER,
        attempt=1,
        reserved_day="2026-11-27",
        content=EmailContent(to=to, subject="Hi", text="x", message_id=f"abl.{uuid.uuid4().hex}"),
    )


SERVER = uuid.uuid4()
LOGIN = "alice@example.com"


def credentials(port: int, per_minute: int | None) -> SmtpCredentials:
    return SmtpCredentials(
        id=SERVER,
        tenant_id=uuid.uuid4(),
        host="localhost",
        port=port,
        security="starttls",
        username=LOGIN,
        password=ACCOUNTS[LOGIN],
        from_email=LOGIN,
        from_name="Alice",
        status="active",
        daily_cap=500,
        per_minute=per_minute,
    )


@pytest.fixture
def smtp(certs: Certificates) -> Iterator[SmtpTestServer]:
    with smtp_server(certs, ACCOUNTS, security="starttls") as server:
        yield server


async def burst(smtp: SmtpTestServer, per_minute: int | None, count: int, minute: float) -> None:
    settings = make_settings("sqlite://", sender_connections_per_server=4)
    deliverer = Deliverer(settings, minute_seconds=minute)
    access = credentials(smtp.port, per_minute)
    try:
        attempts = await asyncio.gather(
            *(deliverer.deliver(job(f"ok+{i}@example.org"), access, utcnow()) for i in range(count))
        )
    finally:
        await deliverer.close()
    assert [a.verdict.outcome for a in attempts] == [Outcome.sent] * count


async def test_a_burst_is_held_to_the_per_minute_limit_at_the_smtp_server(
    smtp: SmtpTestServer,
) -> None:
    """12 jobs at once for a server limited to 5 a "minute" (shortened to 1.5 s): the server
    sees 5, then 5 more a period later, then 2; never 6 within one period."""
    minute = 1.5
    await burst(smtp, 5, 12, minute)
    taken = sorted(smtp.recorder.accepted_at)
    assert len(taken) == 12
    for i in range(len(taken) - 5):
        assert taken[i + 5] - taken[i] >= minute - 0.05, (i, taken)
    assert taken[-1] - taken[0] >= 2 * minute - 0.05


async def test_without_a_limit_the_same_burst_goes_at_once(smtp: SmtpTestServer) -> None:
    """The control: the same burst to a server with no per-minute limit is not spread out (so
    the test above measures the limit, not a slow server)."""
    await burst(smtp, None, 12, 1.5)
    taken = sorted(smtp.recorder.accepted_at)
    assert len(taken) == 12
    assert taken[-1] - taken[0] < 1.5


async def test_a_slot_that_sent_nothing_is_given_back() -> None:
    """A job canceled while it waited takes no place in its server's minute."""
    limit = MinuteLimit(2, period=60.0)
    async with limit.slot() as place:
        place.nothing_sent()
    async with limit.slot():
        pass
    async with limit.slot():
        pass
    assert len(limit.ends) == 2
    # The minute is full now: a third send would wait for the oldest to leave it.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2), limit.slot():
            pass
