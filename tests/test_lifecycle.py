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


@pytest.mark.parametrize(
    ("step", "data_completed", "expected"),
    [
        (Step.dispatch, False, lifecycle.Effects(reserve=True)),
        (Step.deliver, True, lifecycle.Effects(deliver=True)),
        (Step.lose_track, True, lifecycle.Effects()),  # it may have left: the allowance is used
        (Step.refuse, False, lifecycle.Effects(release=True)),  # 5xx before the data
        (Step.refuse, True, lifecycle.Effects()),  # 5xx after the final ".": it was sent
        (Step.retry, False, lifecycle.Effects(release=True)),
        (Step.give_up, False, lifecycle.Effects(release=True)),
        (Step.accept, False, lifecycle.Effects()),
        (Step.cancel, False, lifecycle.Effects()),  # the job's own result gives it back
        (Step.bounce, False, lifecycle.Effects()),
        (Step.suppress, False, lifecycle.Effects()),
    ],
)
def test_each_steps_effect_on_the_servers_counters(
    step: Step, data_completed: bool, expected: lifecycle.Effects
) -> None:
    assert lifecycle.effects(step, data_completed=data_completed) == expected


# What can happen to one email, as the dispatcher, the result applier, the API and the mailbox
# reader do it. A result is taken only for the attempt in flight (the applier's job_id guard),
# so one arriving twice, or with no attempt out, is dropped.
events = st.one_of(
    st.sampled_from(["dispatch", "cancel", "suppress", "stop_sequence", "bounce", "reply"]),
    st.tuples(st.sampled_from(list(Outcome)), st.booleans()),
)


@given(st.lists(events, max_size=40), st.integers(min_value=1, max_value=6))
def test_no_sequence_leaks_a_reservation_or_sends_twice(
    happenings: list[str | tuple[Outcome, bool]], max_attempts: int
) -> None:
    """Whatever arrives in whatever order (results twice or late, cancels while a job is out,
    bounces, suppressions): every reservation is either given back or used by an attempt whose
    data went out (a 4xx after the final "." is retried, and the provider counted it), an
    email that was sent (or may have been) is never dispatched again, and a delivery is
    counted at most once."""
    status = lifecycle.after(None, Step.accept)
    held = 0  # reservations the email holds on its servers' days
    used = 0  # attempts whose data went out: their reservations stay
    delivered = 0
    attempts = 0
    in_flight = False  # a job of this email is out, its result still to come
    went_out = False  # sent, or may have been (`unknown`)
    for happening in happenings:
        data_completed = False
        if isinstance(happening, tuple):
            outcome, data_completed = happening
            # A 250, or a line that died after the final ".": the data went out.
            data_completed = data_completed or outcome in (Outcome.sent, Outcome.unknown)
            if not in_flight:
                continue
            assert status in AWAITING_RESULT
            attempts += outcome is Outcome.retry
            step = lifecycle.attempt_step(outcome, attempts, max_attempts)
            in_flight = False
        else:
            step = Step(happening)
        if not lifecycle.can(status, step):
            continue
        effects = lifecycle.effects(step, data_completed=data_completed)
        if step is Step.dispatch:
            assert not went_out, "an email that was sent is never dispatched again"
            in_flight = True
        status = lifecycle.after(status, step)
        held += effects.reserve - effects.release
        used += step in lifecycle.ATTEMPT_STEPS and not effects.release
        delivered += effects.deliver
        went_out = went_out or step in (Step.deliver, Step.lose_track)
        assert held == used + in_flight, "a reservation leaked or was given back twice"
        assert delivered <= 1
