"""The registry's pure rules: hints a person can act on, statuses, and the check budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.registry import domain
from services.registry.domain import CheckCode, Security, ServerStatus, TokenBucket


@pytest.mark.parametrize(
    ("host", "reply", "needle"),
    [
        ("smtp.gmail.com", "5.7.8 Username and Password not accepted. gsmtp", "app password"),
        ("smtp.gmail.com", "5.7.8 Username and Password not accepted.", "2-Step Verification"),
        (
            "mail.example.net",
            "5.7.8 Username and Password not accepted. abc - gsmtp",
            "app password",
        ),
        (
            "smtp.office365.com",
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication "
            "is disabled for the Tenant",
            "/v1/servers/oauth/microsoft/start",
        ),
        ("mail.example.net", "5.7.8 Authentication credentials invalid", "username and password"),
    ],
)
def test_auth_failure_hints(host: str, reply: str, needle: str) -> None:
    outcome = domain.auth_failure(host, 535, reply)
    assert outcome.code is CheckCode.auth_failed
    assert outcome.hint is not None
    assert needle in outcome.hint
    assert outcome.reply == f"535 {reply}"


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"),
        (550, "5.7.30 Basic authentication is not supported for Client Submission"),
    ],
)
def test_microsoft_365_password_refusals_point_to_the_oauth_route(code: int, reply: str) -> None:
    outcome = domain.auth_failure("smtp.office365.com", code, reply)
    assert outcome.hint is not None
    assert "/v1/servers/oauth/microsoft/start" in outcome.hint
    # The same hint on the server's status after a sender saw the refusal.
    hint = domain.status_hint("auth_failed", f"{code} {reply}", domain.AuthMethod.password, None)
    assert hint == outcome.hint
    # An ordinary wrong password does not send the tenant to OAuth.
    other = domain.status_hint(
        "auth_failed", "535 5.7.8 bad credentials", domain.AuthMethod.password, None
    )
    assert other is not None
    assert "oauth" not in other


def test_an_oauth_server_whose_grant_is_gone_is_told_to_reconnect() -> None:
    hint = domain.status_hint(
        "auth_failed", "invalid_grant: refused", domain.AuthMethod.xoauth2, "google"
    )
    assert hint is not None
    assert "reconnect this account" in hint
    assert "/v1/servers/oauth/google/start" in hint
    assert domain.status_hint(None, None, domain.AuthMethod.xoauth2, "google") is None


@pytest.mark.parametrize(
    ("port", "security", "needle"),
    [
        (587, Security.tls, "starttls"),
        (25, Security.tls, "465"),
        (465, Security.starttls, "'tls'"),
        (465, Security.tls, "certificate"),
    ],
)
def test_tls_failure_hints(port: int, security: Security, needle: str) -> None:
    outcome = domain.tls_failure(port, security, "wrong version number")
    assert outcome.code is CheckCode.tls_failed
    assert outcome.hint is not None
    assert needle in outcome.hint


def test_no_greeting_on_465_with_starttls_is_a_tls_mismatch() -> None:
    assert domain.timed_out(10, 465, Security.starttls, "greeting").code is CheckCode.tls_failed
    assert domain.timed_out(10, 587, Security.starttls, "greeting").code is CheckCode.timeout
    assert domain.timed_out(10, 465, Security.tls, "AUTH reply").code is CheckCode.timeout


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (None, ServerStatus.active),
        (CheckCode.auth_failed, ServerStatus.auth_failed),
        (CheckCode.auth_unsupported, ServerStatus.auth_failed),
        (CheckCode.tls_failed, ServerStatus.tls_failed),
        (CheckCode.timeout, ServerStatus.timeout),
        (CheckCode.connect_failed, ServerStatus.connect_failed),
        (CheckCode.dns_failed, ServerStatus.connect_failed),
        (CheckCode.blocked_host, ServerStatus.blocked_host),
    ],
)
def test_status_after_check(code: CheckCode | None, status: ServerStatus) -> None:
    assert domain.status_after_check(domain.CheckOutcome(code=code, detail="")) is status


def test_presets_are_submission_endpoints() -> None:
    gmail = domain.PRESETS["gmail"]
    assert (gmail.host, gmail.port, gmail.security) == ("smtp.gmail.com", 587, Security.starttls)
    for preset in domain.PRESETS.values():
        assert (preset.port, preset.security) in {(587, Security.starttls), (465, Security.tls)}


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=1.0, burst=2)
    assert [bucket.take(100.0), bucket.take(100.0)] == [0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(1.0)
    assert bucket.take(101.0) == 0.0


@given(
    rate=st.floats(0.01, 10),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 5), min_size=1, max_size=60),
)
def test_token_bucket_never_grants_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now, granted = 1000.0, 0
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        assert wait >= 0
        granted += wait == 0
    assert granted <= burst + rate * (now - 1000.0) + 1e-6


@pytest.mark.parametrize(
    ("current", "found", "settled"),
    [
        # A pause by hand wins over whatever is found: a check, a sender's report, a refused
        # OAuth refresh, the bounce-rate guard.
        (ServerStatus.paused, ServerStatus.active, ServerStatus.paused),
        (ServerStatus.paused, ServerStatus.auth_failed, ServerStatus.paused),
        (ServerStatus.paused, ServerStatus.paused_bounces, ServerStatus.paused),
        # Anything else takes what was found, a pause for bounces included (a check that passes
        # after one is the tenant's own doing, through PATCH or verify).
        (ServerStatus.paused_bounces, ServerStatus.active, ServerStatus.active),
        (ServerStatus.paused_bounces, ServerStatus.paused_bounces, ServerStatus.paused_bounces),
        (ServerStatus.active, ServerStatus.auth_failed, ServerStatus.auth_failed),
        (ServerStatus.auth_failed, ServerStatus.active, ServerStatus.active),
        (ServerStatus.tls_failed, ServerStatus.paused_bounces, ServerStatus.paused_bounces),
    ],
)
def test_a_pause_by_hand_wins(
    current: ServerStatus, found: ServerStatus, settled: ServerStatus
) -> None:
    assert domain.settled_status(current, found) is settled


@given(st.sampled_from(ServerStatus), st.sampled_from(ServerStatus))
def test_only_a_pause_by_hand_is_kept(current: ServerStatus, found: ServerStatus) -> None:
    settled = domain.settled_status(current, found)
    assert settled is (current if current is ServerStatus.paused else found)


@given(st.sampled_from(ServerStatus), st.sampled_from(ServerStatus))
def test_the_update_guard_is_the_same_rule(current: ServerStatus, found: ServerStatus) -> None:
    # A conditional UPDATE skips exactly the rows the rule would leave as they are.
    assert (current in domain.unchanged_by(found)) == (
        domain.settled_status(current, found) is current
    )
