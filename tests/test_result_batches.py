"""Results and events travel in batches: a sender publishes the results that finished together as
one message, an outbox relay its rows in messages of several; their consumers read those and the
one-per-message bodies of the versions before."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.scheduler.models import SchedulerOutbox
from services.sender.reporting import BatchedResults
from shared.batching import Batches, BatchStopped
from shared.broker import InProcessBus
from shared.db import create_engine, session_factory
from shared.errors import PermanentMessageError
from shared.events import Event, EventBatch, EventType, decode_events
from shared.messages import Outcome, ResultsReport, SendResult, parse_results
from shared.outbox import Outbox
from shared.timeutil import utcnow


def result(n: int = 0) -> SendResult:
    return SendResult(
        job_id=uuid.uuid4(),
        email_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        server_id=uuid.uuid4(),
        attempt=1,
        outcome=Outcome.sent,
        smtp_code=250,
        smtp_reply=f"2.0.0 queued as {n}",
        data_completed=True,
        finished_at=utcnow(),
    )


class RecordingBus(InProcessBus):
    """The in-process bus, with every published body kept and the first `failures` refused."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.failures = failures

    async def publish(
        self, queue: str, body: bytes, *, message_id: str, expires_in: float | None = None
    ) -> None:
        await asyncio.sleep(0.01)  # a confirm's round trip, during which more results finish
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker away")
        self.bodies.append(body)
        await super().publish(queue, body, message_id=message_id, expires_in=expires_in)


async def test_results_finished_together_share_a_message_and_each_is_in_exactly_one() -> None:
    bus = RecordingBus()
    results = BatchedResults(bus, "abl.results", per_message=20)
    sent = [result(n) for n in range(50)]
    await asyncio.gather(*(results.publish(r) for r in sent))
    carried = [parse_results(body) for body in bus.bodies]
    assert [len(batch) for batch in carried] == [20, 20, 10]
    assert sorted(r.job_id for batch in carried for r in batch) == sorted(r.job_id for r in sent)


async def test_a_lone_result_is_published_at_once_not_held_for_company() -> None:
    bus = RecordingBus()
    results = BatchedResults(bus, "abl.results")
    await asyncio.wait_for(results.publish(result()), timeout=1.0)
    assert len(bus.bodies) == 1


async def test_results_that_finish_during_a_publish_go_in_the_next_message() -> None:
    bus = RecordingBus()
    results = BatchedResults(bus, "abl.results")
    first = asyncio.create_task(results.publish(result(0)))
    await asyncio.sleep(0.001)  # the first message is now waiting for its confirm
    await asyncio.gather(first, *(results.publish(result(n)) for n in range(1, 6)))
    assert [len(parse_results(body)) for body in bus.bodies] == [1, 5]


async def test_a_refused_message_fails_every_result_in_it_and_only_those() -> None:
    bus = RecordingBus(failures=1)
    results = BatchedResults(bus, "abl.results")
    first = [asyncio.create_task(results.publish(result(n))) for n in range(3)]
    await asyncio.sleep(0.001)
    later = [asyncio.create_task(results.publish(result(n))) for n in range(3, 5)]
    outcomes = await asyncio.gather(*first, *later, return_exceptions=True)
    assert [isinstance(o, ConnectionError) for o in outcomes] == [True] * 3 + [False] * 2
    assert [len(parse_results(body)) for body in bus.bodies] == [2]


def test_a_results_message_may_hold_one_bare_result_or_a_report_of_many() -> None:
    one, many = result(1), [result(n) for n in range(3)]
    assert parse_results(one.model_dump_json().encode()) == [one]
    report = ResultsReport(results=many).model_dump_json().encode()
    assert parse_results(report) == many


@pytest.mark.parametrize(
    "body",
    [b"not json", b"{}", b'{"results": [{"job_id": "x"}]}', b"[]", b'{"results": "no"}'],
)
def test_an_unparsable_results_message_is_refused_for_good(body: bytes) -> None:
    with pytest.raises(PermanentMessageError):
        parse_results(body)


async def test_no_caller_is_left_waiting_when_the_publishing_task_is_cancelled() -> None:
    bus = RecordingBus()
    results = BatchedResults(bus, "abl.results")
    callers = [asyncio.create_task(results.publish(result(n))) for n in range(3)]
    await asyncio.sleep(0.001)  # the first message is waiting for its confirm
    callers.append(asyncio.create_task(results.publish(result(3))))  # waits for the next one
    await asyncio.sleep(0)
    assert results.batches.flusher is not None
    results.batches.flusher.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 1.0)
    assert all(isinstance(o, BatchStopped) for o in outcomes)


async def test_an_unexpected_error_while_publishing_reaches_every_caller_of_that_message() -> None:
    class BrokenBus(RecordingBus):
        async def publish(
            self, queue: str, body: bytes, *, message_id: str, expires_in: float | None = None
        ) -> None:
            raise TypeError("a bug, not the broker")

    results = BatchedResults(BrokenBus(), "abl.results")
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(results.publish(result(n)) for n in range(3)), return_exceptions=True),
        1.0,
    )
    assert all(isinstance(o, TypeError) for o in outcomes)


def event(n: int) -> Event:
    return Event(type=EventType.email_sent, tenant_id=uuid.uuid4(), data={"n": n})


def test_an_events_message_may_hold_one_bare_event_or_a_batch() -> None:
    one, many = event(1), [event(n) for n in range(3)]
    assert decode_events(one.encode()) == [one]
    assert decode_events(EventBatch(events=many).model_dump_json().encode()) == many
    with pytest.raises(ValueError, match="validation error"):
        decode_events(b'{"events": [{"type": "email.sent"}]}')


async def test_the_outbox_relays_its_rows_in_messages_of_several_and_marks_only_confirmed(
    sqlite_url: str,
) -> None:
    engine = create_engine(sqlite_url)
    sessions = session_factory(engine)
    bus = RecordingBus(failures=1)
    relay = Outbox(SchedulerOutbox, sessions, bus, "abl.events", service="test", per_message=3)
    written = [event(n) for n in range(7)]
    async with sessions() as session, session.begin():
        await relay.write(session, written)
    with pytest.raises(ConnectionError):
        await relay.publish_pending()  # the first message is refused, the two others are not
    assert await relay.publish_pending() == 3  # only the refused rows were left pending
    assert await relay.publish_pending() == 0
    carried = [decode_events(body) for body in bus.bodies]
    assert [len(events) for events in carried] == [3, 1, 3]
    assert sorted(e.id for events in carried for e in events) == sorted(e.id for e in written)
    await engine.dispose()


async def test_a_batch_answered_with_the_wrong_number_of_answers_fails_its_callers() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[1:]

    batches: Batches[int, int] = Batches(short, max_batch=10)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(batches.submit(n) for n in range(3)), return_exceptions=True), 1.0
    )
    assert all(isinstance(o, ValueError) for o in outcomes)
