"""The life of an email, in one table: which step takes it from which status to which.

Pure: no I/O, no clock. The repository's guarded statements take their `WHERE status IN (...)`
from `sources(step)` and their new status from `TRANSITIONS`, and the result applier decides
with `after_attempt`, so a status change that is not in this table cannot be written anywhere.
`effects` says what each step does to the server's counters (reserve, give back, count a
delivery); the result applier takes its counter changes from it.

    (accepted) ──accept──▶ queued ──dispatch──▶ scheduled ──deliver──▶ sent ──bounce──▶ bounced
        │                   │  ▲                  │  │                   │
        │                   │  └──────retry───────┘  ├─lose_track─▶ unknown ──reply──▶ replied
        │                   │                        ├─refuse/give_up─▶ failed
        └─refuse_suppressed─┴─suppress─▶ suppressed  └─cancel─▶ canceled (and from queued)

A canceled email whose job was already out still gets that attempt's result: `deliver` or
`lose_track` wins over the cancel (the message left, the tenant must know), anything else
leaves it canceled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from shared.messages import Outcome


class EmailStatus(StrEnum):
    queued = "queued"
    scheduled = "scheduled"
    sent = "sent"
    failed = "failed"
    unknown = "unknown"
    canceled = "canceled"
    # Deliverability states: `bounced` and `replied` follow `sent` (the mailbox reader saw a
    # bounce or a reply); `suppressed` means the recipient is on the tenant's suppression list
    # and the email was never sent.
    bounced = "bounced"
    replied = "replied"
    suppressed = "suppressed"


class Step(StrEnum):
    accept = "accept"  # intake, recipient not suppressed
    refuse_suppressed = "refuse_suppressed"  # intake, recipient suppressed: never sent
    dispatch = "dispatch"  # a server, a reservation and a job assigned
    deliver = "deliver"  # the SMTP server accepted the message
    lose_track = "lose_track"  # the line dropped after DATA: it may have left
    refuse = "refuse"  # a permanent refusal (5xx, a message that cannot be built)
    retry = "retry"  # a transient failure with attempts left
    give_up = "give_up"  # a transient failure with no attempt left
    cancel = "cancel"  # the tenant canceled it
    stop_sequence = "stop_sequence"  # a reply or bounce ended its sequence for this recipient
    suppress = "suppress"  # its recipient was suppressed while it waited
    bounce = "bounce"  # a hard bounce came back
    reply = "reply"  # the recipient answered


S = EmailStatus
# Before intake an email has no status: `None` is "not yet stored".
TRANSITIONS: Mapping[Step, Mapping[EmailStatus | None, EmailStatus]] = {
    Step.accept: {None: S.queued},
    Step.refuse_suppressed: {None: S.suppressed},
    Step.dispatch: {S.queued: S.scheduled},
    Step.deliver: {S.scheduled: S.sent, S.canceled: S.sent},
    Step.lose_track: {S.scheduled: S.unknown, S.canceled: S.unknown},
    Step.refuse: {S.scheduled: S.failed, S.canceled: S.canceled},
    Step.retry: {S.scheduled: S.queued, S.canceled: S.canceled},
    Step.give_up: {S.scheduled: S.failed, S.canceled: S.canceled},
    Step.cancel: {S.queued: S.canceled, S.scheduled: S.canceled},
    Step.stop_sequence: {S.queued: S.canceled},
    Step.suppress: {S.queued: S.suppressed},
    Step.bounce: {S.sent: S.bounced, S.unknown: S.bounced},
    Step.reply: {S.sent: S.replied, S.unknown: S.replied},
}

# Where an email rests: nothing the product does moves it on, only news from outside (a
# bounce, a reply) may still change a sent one.
FINAL_STATUSES = frozenset(
    {S.sent, S.failed, S.unknown, S.canceled, S.bounced, S.replied, S.suppressed}
)
# An attempt in flight: a result names its job, and only these statuses take it.
AWAITING_RESULT = frozenset({S.scheduled, S.canceled})
# Emails that left (or may have): the bounce-rate guard's denominator.
LEFT = frozenset({S.sent, S.unknown, S.bounced, S.replied})


class IllegalTransition(ValueError):
    def __init__(self, status: EmailStatus | None, step: Step) -> None:
        super().__init__(f"an email {status or 'not yet stored'} cannot take the step {step}")


def sources(step: Step) -> tuple[EmailStatus, ...]:
    """The stored statuses from which `step` may be taken: a guarded statement's WHERE. In the
    order of an email's life, so that statements tried one status at a time follow an email
    that moves on meanwhile (queued, then scheduled) instead of missing it."""
    return tuple(status for status in EmailStatus if status in TRANSITIONS[step])


def source(step: Step) -> EmailStatus:
    """The one stored status a step starts from (for statements run once per row, where an
    IN list cannot be bound)."""
    (only,) = sources(step)
    return only


def target(step: Step) -> EmailStatus:
    """The status a guarded statement writes for a step with a single destination."""
    destinations = set(TRANSITIONS[step].values())
    if len(destinations) != 1:
        raise ValueError(f"{step} has several destinations; use after()")
    return destinations.pop()


def after(status: EmailStatus | None, step: Step) -> EmailStatus:
    try:
        return TRANSITIONS[step][status]
    except KeyError:
        raise IllegalTransition(status, step) from None


def can(status: EmailStatus | None, step: Step) -> bool:
    return status in TRANSITIONS[step]


def attempt_step(outcome: Outcome, attempts_made: int, max_attempts: int) -> Step:
    """The step an attempt's outcome takes, given how many attempts the email has made with
    this one."""
    match outcome:
        case Outcome.sent:
            return Step.deliver
        case Outcome.unknown:
            return Step.lose_track
        case Outcome.failed:
            return Step.refuse
        case Outcome.retry:
            return Step.retry if attempts_made < max_attempts else Step.give_up


# The steps an attempt's result takes (`attempt_step`).
ATTEMPT_STEPS = frozenset({Step.deliver, Step.lose_track, Step.refuse, Step.retry, Step.give_up})


@dataclass(frozen=True)
class Effects:
    """What a step does to the server's counters for the day (and hour) the email was
    reserved on, besides its status."""

    reserve: bool = False  # one of the server's allowance taken (the dispatch's statement)
    release: bool = False  # given back: the attempt ended before the message's data went out
    deliver: bool = False  # counted as sent on that day


def effects(step: Step, *, data_completed: bool = False) -> Effects:
    """A dispatch reserves; an attempt's result gives the reservation back when its data never
    completed (refused, retried, given up, or skipped because canceled, all before the final
    "."), keeps it otherwise (the message left or may have), and counts a delivery. Any other
    step leaves the counters alone."""
    if step is Step.dispatch:
        return Effects(reserve=True)
    if step in ATTEMPT_STEPS:
        return Effects(release=not data_completed, deliver=step is Step.deliver)
    return Effects()
