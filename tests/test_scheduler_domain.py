"""The scheduler's pure rules, with tables and hypothesis properties."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler import domain
from services.scheduler.domain import (
    SendingWindow,
    ServerLoad,
    WarmupSchedule,
    WarmupState,
    close_day,
    plan_share,
)

SCHEDULE = WarmupSchedule()
DAY = date(2026, 11, 2)

STEPS = [20, 26, 34, 45, 59, 77, 101, 132, 172, 224, 292, 380, 494, 500]


def test_default_schedule_is_the_documented_table() -> None:
    assert SCHEDULE.steps() == STEPS
    assert SCHEDULE.top_step() == 14
    assert SCHEDULE.allowance(14) == SCHEDULE.allowance(40) == 500


@pytest.mark.parametrize(
    ("daily_cap", "top_step", "last"),
    [(500, 14, 500), (100, 7, 100), (20, 1, 20), (10, 1, 10), (250, 11, 250)],
)
def test_daily_cap_shortens_the_ramp(daily_cap: int, top_step: int, last: int) -> None:
    assert SCHEDULE.top_step(daily_cap) == top_step
    assert SCHEDULE.steps(daily_cap)[-1] == last


@pytest.mark.parametrize(
    ("state", "delivered", "allowance", "expected"),
    [
        (WarmupState(1, DAY), 20, 20, WarmupState(2, DAY + timedelta(1))),
        (WarmupState(1, DAY), 10, 20, WarmupState(2, DAY + timedelta(1))),  # exactly half
        (WarmupState(1, DAY), 9, 20, WarmupState(1, DAY + timedelta(1))),  # barely used
        (WarmupState(5, DAY), 0, 59, WarmupState(5, DAY + timedelta(1), idle_days=1)),
        (WarmupState(5, DAY, 1), 0, 59, WarmupState(5, DAY + timedelta(1), idle_days=2)),
        (WarmupState(5, DAY, 2), 0, 59, WarmupState(1, DAY + timedelta(1), idle_days=3)),
        (WarmupState(5, DAY, 2), 1, 59, WarmupState(5, DAY + timedelta(1), idle_days=0)),
        (WarmupState(14, DAY), 500, 500, WarmupState(14, DAY + timedelta(1))),
    ],
)
def test_close_day_table(
    state: WarmupState, delivered: int, allowance: int, expected: WarmupState
) -> None:
    assert close_day(state, delivered, allowance, SCHEDULE, 500) == expected


@pytest.mark.parametrize(
    ("delivered", "bounced", "pause_ratio", "held"),
    [
        (100, 2, 0.05, False),  # 2 %: under half of 5 %
        (100, 3, 0.05, True),  # 3 % > 2.5 %
        (200, 5, 0.05, False),  # exactly half: not above
        (200, 6, 0.05, True),
        (40, 1, 0.05, False),  # 2.5 %: exactly half
        (39, 1, 0.05, True),
        (0, 0, 0.05, False),  # nothing sent: nothing to judge (idle rules apply)
        (10, 1, 0.5, False),  # 10 % under half of 50 %
        (10, 3, 0.5, True),
    ],
)
def test_climb_held_above_half_the_pause_ratio(
    delivered: int, bounced: int, pause_ratio: float, held: bool
) -> None:
    assert domain.climb_held(delivered, bounced, pause_ratio) is held


@pytest.mark.parametrize(
    ("state", "delivered", "bounced", "expected_step"),
    [
        (WarmupState(3, DAY), 34, 0, 4),
        (WarmupState(4, DAY), 45, 1, 5),  # 2.2 %: climbs
        (WarmupState(3, DAY), 34, 2, 3),  # 5.9 %: holds
        (WarmupState(14, DAY), 500, 400, 14),  # never goes down for bounces: the guard pauses
        (WarmupState(1, DAY), 9, 0, 1),  # barely used, no bounces: holds as before
    ],
)
def test_a_day_with_many_bounces_does_not_climb(
    state: WarmupState, delivered: int, bounced: int, expected_step: int
) -> None:
    allowance = SCHEDULE.allowance(state.step)
    after = close_day(state, delivered, allowance, SCHEDULE, 500, bounced)
    assert (after.step, after.day, after.idle_days) == (expected_step, DAY + timedelta(1), 0)


@given(
    days=st.lists(st.tuples(st.integers(0, 600), st.floats(0, 1)), min_size=1, max_size=40),
    pause_ratio=st.floats(0.001, 1),
)
def test_bounces_only_ever_hold_the_step(days: list[tuple[int, float]], pause_ratio: float) -> None:
    """Folding days with bounces gives the same as without, except that a day above half the
    pause ratio never climbs: the step with bounces is never above the step without."""
    schedule = WarmupSchedule(bounce_pause_ratio=pause_ratio)
    with_bounces = without = domain.fresh_state(DAY)
    for delivered, share in days:
        bounced = int(delivered * share)
        allowance = schedule.allowance(with_bounces.step)
        after = close_day(with_bounces, delivered, allowance, schedule, 500, bounced)
        if domain.climb_held(delivered, bounced, pause_ratio):
            assert after.step <= with_bounces.step
        else:
            assert after == close_day(with_bounces, delivered, allowance, schedule, 500)
        with_bounces = after
        without = close_day(without, delivered, schedule.allowance(without.step), schedule, 500)
        assert with_bounces.step <= without.step or with_bounces.step == 1
    history = {DAY + timedelta(i): n for i, (n, _) in enumerate(days)}
    bounces = {DAY + timedelta(i): int(n * f) for i, (n, f) in enumerate(days)}
    end = DAY + timedelta(len(days))
    folded = domain.state_on(domain.fresh_state(DAY), end, history, {}, schedule, 500, bounces)
    assert folded == with_bounces


def test_full_sending_reaches_500_on_day_14_and_stays() -> None:
    rows = domain.projection(domain.fresh_state(DAY), 30, SCHEDULE, 500)
    assert [a for _, _, a in rows[:14]] == STEPS
    assert all(a == 500 for _, _, a in rows[13:])


@given(st.lists(st.integers(0, 600), min_size=1, max_size=60))
def test_three_idle_days_always_restart_the_warmup(delivered: list[int]) -> None:
    state = domain.fresh_state(DAY)
    history = {DAY + timedelta(i): n for i, n in enumerate(delivered)}
    end = DAY + timedelta(len(delivered))
    folded = domain.state_on(state, end, history, {}, SCHEDULE, 500)
    if len(delivered) >= 3 and delivered[-3:] == [0, 0, 0]:
        assert folded.step == 1
    assert 1 <= folded.step <= 14
    # The step never rises more than one a day.
    assert folded.step <= 1 + sum(1 for n in delivered if n > 0)


@given(
    loads=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 600)), min_size=1, max_size=12),
    emails=st.integers(0, 3000),
    seed=st.integers(),
)
def test_plan_share_properties(loads: list[tuple[int, int]], emails: int, seed: int) -> None:
    servers = [ServerLoad(f"s{i}", used, can) for i, (used, can) in enumerate(loads)]
    plan = plan_share(servers, emails, random.Random(seed))
    assert sum(plan.values()) == min(emails, sum(can for _, can in loads))
    for server in servers:
        assert plan.get(server.server_id, 0) <= server.can_take
    # Water-filling: a server that got an email never ends more than one above another server
    # that still had room.
    after = {s.server_id: s.used_today + plan.get(s.server_id, 0) for s in servers}
    for a in servers:
        for b in servers:
            room_left = plan.get(a.server_id, 0) < a.can_take
            if plan.get(b.server_id, 0) > 0 and room_left:
                assert after[b.server_id] <= after[a.server_id] + 1


@given(count=st.integers(1, 10), emails=st.integers(0, 5000), seed=st.integers())
def test_equal_servers_get_shares_that_differ_by_at_most_one(
    count: int, emails: int, seed: int
) -> None:
    servers = [ServerLoad(f"s{i}", 0, 10_000) for i in range(count)]
    plan = plan_share(servers, emails, random.Random(seed))
    shares = [plan.get(s.server_id, 0) for s in servers]
    assert max(shares) - min(shares) <= 1
    assert sum(shares) == emails


def test_product_examples() -> None:
    warm = [ServerLoad(f"s{i}", 0, 500) for i in range(3)]
    assert sorted(plan_share(warm, 30, random.Random(1)).values()) == [10, 10, 10]
    fresh = [ServerLoad(f"s{i}", 0, 20) for i in range(3)]
    assert sorted(plan_share(fresh, 100, random.Random(1)).values()) == [20, 20, 20]


def test_ties_are_broken_at_random() -> None:
    servers = [ServerLoad(f"s{i}", 0, 1) for i in range(3)]
    firsts = {next(iter(plan_share(servers, 1, random.Random(seed)))) for seed in range(50)}
    assert firsts == {"s0", "s1", "s2"}


NOW = datetime(2026, 11, 26, 12, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({}, 0),
        ({NOW.replace(minute=0): 5}, 5),
        ({NOW.replace(minute=0) - timedelta(hours=24): 7}, 7),  # the boundary hour counts
        ({NOW.replace(minute=0) - timedelta(hours=25): 7}, 0),
        ({NOW.replace(minute=0) - timedelta(hours=h): 1 for h in range(30)}, 25),
    ],
)
def test_rolling_used_table(usage: dict[datetime, int], expected: int) -> None:
    assert domain.rolling_used(usage, NOW) == expected


@given(
    hours=st.dictionaries(st.integers(0, 47), st.integers(0, 100), max_size=48),
    allowance=st.integers(1, 500),
    used_today=st.integers(0, 500),
)
def test_sendable_never_exceeds_daily_or_rolling_allowance(
    hours: dict[int, int], allowance: int, used_today: int
) -> None:
    usage = {NOW.replace(minute=0) - timedelta(hours=h): n for h, n in hours.items()}
    rolling = domain.rolling_used(usage, NOW)
    can = domain.sendable_now(
        now=NOW,
        window=SendingWindow(),
        allowance=allowance,
        used_today=used_today,
        rolling_used=rolling,
        pacing=False,
        jitter_key="x",
    )
    assert can >= 0
    assert used_today + can <= max(allowance, used_today)
    assert rolling + can <= max(allowance, rolling)


def test_pacing_spreads_a_day_over_the_window() -> None:
    window = SendingWindow("Europe/Paris", 9, 17)
    day = date(2026, 11, 26)
    slots = [domain.slot_time(window, day, 500, i, "srv") for i in range(500)]
    start, end = window.bounds(day)
    assert start == datetime(2026, 11, 26, 8, 0, tzinfo=UTC)  # 09:00 in Paris
    assert all(start <= s < end for s in slots)
    assert slots == sorted(slots)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(slots)]
    assert min(gaps) > 0
    assert max(gaps) < 2 * (8 * 3600 / 500)
    # No burst: in any hour at most an hour's share (plus one for the jitter).
    per_hour = [sum(1 for s in slots if s.hour == h) for h in range(8, 16)]
    assert max(per_hour) <= 500 / 8 + 2


def test_pacing_releases_only_due_slots() -> None:
    window = SendingWindow()
    start = datetime(2026, 11, 26, tzinfo=UTC)

    def sendable(now: datetime, pacing: bool) -> int:
        return domain.sendable_now(
            now=now,
            window=window,
            allowance=24,
            used_today=0,
            rolling_used=0,
            pacing=pacing,
            jitter_key="k",
        )

    assert sendable(start, pacing=True) in (0, 1)
    assert sendable(start + timedelta(hours=5), pacing=True) in (5, 6)
    assert sendable(start, pacing=False) == 24
    outside = SendingWindow("UTC", 9, 17)
    assert (
        domain.sendable_now(
            now=start + timedelta(hours=20),
            window=outside,
            allowance=24,
            rolling_used=0,
            used_today=0,
            pacing=False,
            jitter_key="k",
        )
        == 0
    )


def test_capacity_of_the_product_example() -> None:
    advice = domain.capacity(20_000, SCHEDULE)
    assert advice.per_server_first_month == sum(STEPS[:13]) + 17 * 500
    assert advice.recommended_servers == 3
    assert advice.minimum_servers == 2
    assert domain.capacity(0, SCHEDULE).recommended_servers == 0


@given(st.integers(1, 40), st.integers())
def test_retry_delay_grows_and_stays_bounded(attempt: int, seed: int) -> None:
    policy = domain.RetryPolicy(base_seconds=60, cap_seconds=3600)
    delay = policy.delay(attempt, random.Random(seed)).total_seconds()
    ceiling = min(3600, 60 * 2 ** (attempt - 1))
    assert ceiling / 2 <= delay <= ceiling


candidates = st.lists(
    st.builds(
        domain.Candidate,
        server_id=st.uuids().map(str),
        tenant_id=st.sampled_from(["t1", "t2", "t3"]),
        active=st.booleans(),
        parked_until=st.none() | st.just(NOW + timedelta(hours=1)) | st.just(NOW),
    ),
    max_size=20,
)


@given(candidates, st.sampled_from(["t1", "t2", "t3"]), st.integers(0, 2000), st.integers())
def test_a_tenants_emails_only_ever_go_to_its_own_servers(
    servers: list[domain.Candidate], tenant: str, emails: int, seed: int
) -> None:
    own = {c.server_id for c in servers if c.tenant_id == tenant}
    ids = domain.eligible(servers, tenant, NOW)
    plan = plan_share([ServerLoad(i, 0, 500) for i in ids], emails, random.Random(seed))
    assert set(plan) <= own
    for server in servers:
        if server.server_id in plan:
            assert server.active
            assert server.parked_until is None or server.parked_until <= NOW


@pytest.mark.parametrize(
    ("previous", "assigned", "expected"),
    [
        (["a", None], ["a", "b"], ["b", "a"]),
        (["a"], ["a"], ["a"]),  # the only server: it takes the retry again
        ([None, None], ["a", "b"], ["a", "b"]),
        (["a", "b"], ["a", "b"], ["b", "a"]),
        (["b", "a", None], ["a", "a", "b"], ["a", "b", "a"]),
    ],
)
def test_a_retry_prefers_another_server(
    previous: list[str | None], assigned: list[str], expected: list[str]
) -> None:
    assert domain.avoid_previous_server(previous, assigned) == expected


@given(
    st.lists(st.tuples(st.sampled_from([None, "a", "b", "c"]), st.sampled_from("abc")), max_size=30)
)
def test_avoiding_the_previous_server_keeps_each_servers_share(
    pairs: list[tuple[str | None, str]],
) -> None:
    previous = [p for p, _ in pairs]
    assigned = [a for _, a in pairs]
    result = domain.avoid_previous_server(previous, assigned)
    assert sorted(result) == sorted(assigned)
