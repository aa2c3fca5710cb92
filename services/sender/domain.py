"""What an SMTP exchange's end means, free of I/O.

The line between "the server may have the email" and "it certainly does not" is the final ".":
every failure before it is safe to retry and gives the reservation back; a line that dies after
it may have delivered, so the email is `unknown` and never resent on its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from shared.messages import Outcome


class Stage(StrEnum):
    connect = "connect"
    auth = "auth"
    mail = "mail"
    rcpt = "rcpt"
    data = "data"  # the DATA command, before 354
    end_of_data = "end_of_data"  # the payload and its final "." were written


class ServerProblem(StrEnum):
    quota = "quota"
    auth_failed = "auth_failed"
    # The registry no longer lets the server send (paused, auth_failed, deleted) though the
    # job was dispatched to it: the scheduler's copy had not heard yet. Not the email's fault.
    inactive = "inactive"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    data_completed: bool
    server_problem: ServerProblem | None = None
    reason: str = ""


_QUOTA = re.compile(
    r"5\.4\.5|4\.7\.0|4\.3\.2|quota|rate limit|too many (messages|connections|recipients)|"
    r"SubmissionQuotaExceeded|sending limit",
    re.IGNORECASE,
)


def is_quota_reply(code: int, text: str) -> bool:
    """Gmail 550 5.4.5, Microsoft 554 5.2.0 SubmissionQuotaExceeded, 421 4.7.0, 432 4.3.2."""
    if code in (421, 432) and re.search(r"4\.7\.0|4\.3\.2", text):
        return True
    return bool(_QUOTA.search(text)) and code >= 400


def classify_reply(stage: Stage, code: int, text: str) -> Verdict:
    """A server's reply code at `stage` (the reply to the final "." for end_of_data)."""
    after_dot = stage is Stage.end_of_data
    if 200 <= code < 300 and after_dot:
        return Verdict(Outcome.sent, True, reason="accepted")
    if code == 535 or (stage is Stage.auth and code in (534, 530)):
        return Verdict(Outcome.retry, False, ServerProblem.auth_failed, "authentication failed")
    if stage is Stage.auth and code >= 500:
        # Microsoft 365 refuses passwords with `550 5.7.30 Basic authentication is not
        # supported`: the account, not this email, is at fault, and only OAuth helps.
        return Verdict(Outcome.retry, False, ServerProblem.auth_failed, "authentication refused")
    if is_quota_reply(code, text):
        return Verdict(Outcome.retry, after_dot, ServerProblem.quota, "sending quota reached")
    if 400 <= code < 500:
        return Verdict(Outcome.retry, after_dot, reason="transient reply")
    if code >= 500 and stage in (Stage.rcpt, Stage.end_of_data):
        return Verdict(Outcome.failed, after_dot, reason="refused for good")
    if code >= 500:
        # MAIL FROM or DATA refused with 5xx: the server or the account is at fault, not this
        # email; another server may take it.
        return Verdict(Outcome.retry, False, reason="server refused the transaction")
    return Verdict(Outcome.retry, after_dot, reason=f"unexpected reply {code}")


def classify_lost_line(stage: Stage) -> Verdict:
    """The connection died or timed out at `stage`, with no reply."""
    if stage is Stage.end_of_data:
        return Verdict(Outcome.unknown, True, reason="line lost after the final '.'")
    return Verdict(Outcome.retry, False, reason=f"line lost at {stage.value}")


# Providers known to allow more parallel SMTP sessions per mailbox than the default.
PROVIDER_CONNECTION_LIMITS = {
    "smtp.office365.com": 3,  # Microsoft 365: 3 concurrent connections per mailbox
}


def connection_limit(host: str, default: int) -> int:
    """How many SMTP sessions a sender keeps open at once to one server."""
    return max(default, PROVIDER_CONNECTION_LIMITS.get(host.lower(), default))


def minute_wait(
    ends: Sequence[float], in_flight: int, now: float, limit: int, period: float = 60.0
) -> float | None:
    """How long a send must wait under a provider's per-minute limit (Microsoft 365: 30 a
    minute): 0 to start now, a number of seconds, or None to wait for a send in flight to end.

    A send counts from its start until `period` after its end (`ends`: when the last sends
    ended, oldest first), so no `period` seconds ever see more than `limit` messages reach the
    server, however the jobs arrive and however long each transaction takes."""
    recent = [end for end in ends if end > now - period]
    if len(recent) + in_flight < limit:
        return 0.0
    if len(recent) + in_flight - limit < len(recent):
        # Enough ended sends leave the window over time: the oldest one that must leave.
        return recent[len(recent) + in_flight - limit] + period - now
    return None
