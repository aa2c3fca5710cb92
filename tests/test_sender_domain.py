"""The sender's pure rules: what a reply means, and how many sessions a server gets."""

from __future__ import annotations

import pytest

from services.sender import domain
from services.sender.domain import ServerProblem, Stage
from shared.messages import Outcome


@pytest.mark.parametrize(
    ("stage", "code", "text", "outcome", "data_completed", "problem"),
    [
        (Stage.end_of_data, 250, "2.0.0 OK", Outcome.sent, True, None),
        (Stage.rcpt, 550, "5.1.1 no such user", Outcome.failed, False, None),
        (Stage.end_of_data, 554, "5.7.1 rejected as spam", Outcome.failed, True, None),
        (Stage.rcpt, 451, "4.2.1 mailbox busy", Outcome.retry, False, None),
        (Stage.end_of_data, 451, "4.4.1 local problem", Outcome.retry, True, None),
        (
            Stage.mail,
            550,
            "5.4.5 Daily user sending quota exceeded.",
            Outcome.retry,
            False,
            ServerProblem.quota,
        ),
        (
            Stage.rcpt,
            554,
            "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
            Outcome.retry,
            False,
            ServerProblem.quota,
        ),
        (
            Stage.mail,
            421,
            "4.7.0 Try again later, closing connection",
            Outcome.retry,
            False,
            ServerProblem.quota,
        ),
        (
            Stage.connect,
            432,
            "4.3.2 too many connections",
            Outcome.retry,
            False,
            ServerProblem.quota,
        ),
        (
            Stage.auth,
            535,
            "5.7.8 Username and Password not accepted",
            Outcome.retry,
            False,
            ServerProblem.auth_failed,
        ),
        (Stage.mail, 553, "5.7.1 sender not allowed", Outcome.retry, False, None),
    ],
)
def test_classify_reply_table(
    stage: Stage,
    code: int,
    text: str,
    outcome: Outcome,
    data_completed: bool,
    problem: ServerProblem | None,
) -> None:
    verdict = domain.classify_reply(stage, code, text)
    assert (verdict.outcome, verdict.data_completed, verdict.server_problem) == (
        outcome,
        data_completed,
        problem,
    )


@pytest.mark.parametrize("stage", [s for s in Stage if s is not Stage.end_of_data])
def test_a_line_lost_before_the_final_dot_is_retried_and_released(stage: Stage) -> None:
    verdict = domain.classify_lost_line(stage)
    assert (verdict.outcome, verdict.data_completed) == (Outcome.retry, False)


def test_a_line_lost_after_the_final_dot_is_unknown_and_counted() -> None:
    verdict = domain.classify_lost_line(Stage.end_of_data)
    assert (verdict.outcome, verdict.data_completed) == (Outcome.unknown, True)


@pytest.mark.parametrize(
    ("host", "default", "limit"),
    [
        ("smtp.office365.com", 2, 3),
        ("SMTP.OFFICE365.COM", 2, 3),
        ("smtp.gmail.com", 2, 2),
        ("smtp.office365.com", 5, 5),
    ],
)
def test_connection_limit_per_provider(host: str, default: int, limit: int) -> None:
    assert domain.connection_limit(host, default) == limit
