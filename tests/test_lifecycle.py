"""The email lifecycle table: every transition, and properties of any path through it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler import lifecycle
from services.scheduler.lifecycle import (
    AWAITING_RESULT,
    FINAL_STATUSES,
    EmailStatus,
    IllegalTransition,
    Step,
)
from shared.messages import Outcome

S = EmailStatus


@pytest.mark.parametrize(
    ("status", "step", "expected"),
    [
        (None, Step.accept, S.queued),
        (None, Step.refuse_suppressed, S.suppressed),
        (S.queued, Step.dispatch, S.scheduled),
        (S.scheduled, Step.deliver, S.sent),
        (S.canceled, Step.deliver, S.sent),  # it left: the truth wins over a late cancel
        (S.scheduled, Step.lose_track, S.unknown),
        (S.canceled, Step.lose_track, S.unknown),
        (S.scheduled, Step.refuse, S.failed),
        (S.canceled, Step.refuse, S.canceled),
        (S.scheduled, Step.retry, S.queued),
        (S.canceled, Step.retry, S.canceled),
        (S.scheduled, Step.give_up, S.failed),
        (S.queued, Step.cancel, S.canceled),
        (S.scheduled, Step.cancel, S.canceled),
        (S.queued, Step.stop_sequence, S.canceled),
        (S.queued, Step.suppress, S.suppressed),
        (S.sent, Step.bounce, S.bounced),
        (S.unknown, Step.bounce, S.bounced),
        (S.sent, Step.reply, S.replied),
        (S.unknown, Step.reply, S.replied),
    ],
)
def test_each_transition(status: EmailStatus | None, step: Step, expected: EmailStatus) -> None:
    assert lifecycle.after(status, step) is expected


@pytest.mark.parametrize(
    ("status", "step"),
    [
        (S.sent, Step.cancel),  # gone is gone
        (S.scheduled, Step.dispatch),  # one job at a time
        (S.queued, Step.deliver),  # no result without a job
        (S.failed, Step.retry),
        (S.canceled, Step.bounce),  # a bounce only follows a send
        (S.suppressed, Step.reply),
        (S.scheduled, Step.stop_sequence),  # its job is out: a sequence stop leaves it be
        (None, Step.dispatch),
        (S.bounced, Step.reply),
    ],
)
def test_refused_transitions(status: EmailStatus | None, step: Step) -> None:
    assert not lifecycle.can(status, step)
    with pytest.raises(IllegalTransition, match=str(step)):
        lifecycle.after(status, step)


@pytest.mark.parametrize(
    ("outcome", "attempts", "expected"),
    [
        (Outcome.sent, 1, Step.deliver),
        (Outcome.unknown, 1, Step.lose_track),
        (Outcome.failed, 1, Step.refuse),
        (Outcome.retry, 1, Step.retry),
        (Outcome.retry, 4, Step.retry),
        (Outcome.retry, 5, Step.give_up),
        (Outcome.retry, 9, Step.give_up),
    ],
)
def test_attempt_step(outcome: Outcome, attempts: int, expected: Step) -> None:
    assert lifecycle.attempt_step(outcome, attempts, max_attempts=5) is expected


def test_guards_come_from_the_table() -> None:
    assert lifecycle.sources(Step.cancel) == (S.queued, S.scheduled)  # the order of a life
    assert lifecycle.sources(Step.dispatch) == (S.queued,)
    assert lifecycle.source(Step.dispatch) is S.queued
    assert lifecycle.target(Step.dispatch) is S.scheduled
    with pytest.raises(ValueError, match="too many values"):
        lifecycle.source(Step.cancel)
    assert lifecycle.target(Step.cancel) is S.canceled
    with pytest.raises(ValueError, match="several destinations"):
        lifecycle.target(Step.refuse)  # failed, or canceled for a canceled attempt
    assert set(lifecycle.sources(Step.deliver)) == AWAITING_RESULT


def test_every_status_is_reachable_and_none_is_a_dead_end() -> None:
    reached: set[EmailStatus | None] = {None}
    while True:
        more = {
            destination
            for moves in lifecycle.TRANSITIONS.values()
            for source, destination in moves.items()
            if source in reached
        } - reached
        if not more:
            break
        reached |= more
    assert reached - {None} == set(EmailStatus)
    # A status the product itself must still move on has somewhere to go.
    for status in set(EmailStatus) - FINAL_STATUSES:
        assert any(
            status in moves and moves[status] != status for moves in lifecycle.TRANSITIONS.values()
        ), status


steps = st.sampled_from(list(Step))


@given(st.lists(steps, max_size=30))
def test_a_final_status_stays_final(path: list[Step]) -> None:
    """Whatever happens to an email, once final it only moves to another final status."""
    status: EmailStatus | None = None
    for step in path:
        if not lifecycle.can(status, step):
            continue
        before, status = status, lifecycle.after(status, step)
        if before in FINAL_STATUSES:
            assert status in FINAL_STATUSES


@given(
    st.lists(st.sampled_from(list(Outcome)), min_size=1, max_size=20),
    st.integers(min_value=1, max_value=8),
)
def test_every_accepted_email_ends_within_its_attempts(
    outcomes: list[Outcome], max_attempts: int
) -> None:
    """Dispatched again after each transient failure, an email is final after at most
    `max_attempts` attempts, whatever the SMTP servers answer."""
    status = lifecycle.after(None, Step.accept)
    attempts = 0
    dispatches = 0
    for outcome in outcomes * max_attempts:  # enough answers for every attempt
        status = lifecycle.after(status, Step.dispatch)
        dispatches += 1
        attempts += outcome is Outcome.retry
        status = lifecycle.after(status, lifecycle.attempt_step(outcome, attempts, max_attempts))
        if status in FINAL_STATUSES:
            break
    assert status in FINAL_STATUSES
    assert dispatches <= max_attempts


@given(st.sampled_from(list(Outcome)), st.integers(min_value=1, max_value=5))
def test_a_canceled_attempt_is_canceled_unless_it_left(outcome: Outcome, attempts: int) -> None:
    status = lifecycle.after(lifecycle.after(S.queued, Step.dispatch), Step.cancel)
    final = lifecycle.after(status, lifecycle.attempt_step(outcome, attempts, 5))
    left = outcome in (Outcome.sent, Outcome.unknown)
    assert final is (
        {Outcome.sent: S.sent, Outcome.unknown: S.unknown}[outcome] if left else S.canceled
    )
