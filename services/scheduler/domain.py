"""The scheduler's rules, free of I/O: warmup, allowance, even share, pacing, retries, capacity.

Every function takes the time (`now`, a `day`) and any randomness (`rng`) as arguments.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TypeVar
from zoneinfo import ZoneInfo

from shared.providers import Provider, provider_of

ServerT = TypeVar("ServerT")  # a server's id, whatever its type


@dataclass(frozen=True)
class WarmupSchedule:
    first: int = 20
    factor: float = 1.3
    cap: int = 500
    advance_ratio: float = 0.5
    idle_reset_days: int = 3
    # The bounce-rate guard's pause ratio: a day whose hard-bounce rate passed half of it does
    # not count toward the next step (`climb_held`).
    bounce_pause_ratio: float = 0.05

    def steps(self, daily_cap: int | None = None) -> list[int]:
        """Allowance of each step, from step 1 to the first that reaches the cap."""
        # `daily_cap` is the top of this server's ramp (see `ramp_top`): it may pass
        # `self.cap` for a provider known to allow more, such as Microsoft 365.
        cap = daily_cap or self.cap
        values = [min(self.first, cap)]
        while values[-1] < cap:
            values.append(min(cap, math.ceil(values[-1] * self.factor)))
        return values

    def allowance(self, step: int, daily_cap: int | None = None) -> int:
        steps = self.steps(daily_cap)
        return steps[min(step, len(steps)) - 1]

    def top_step(self, daily_cap: int | None = None) -> int:
        return len(self.steps(daily_cap))


def ramp_top(provider: Provider | None, daily_cap: int, schedule: WarmupSchedule) -> int:
    """The most a server may send in a day once warm: the lowest of the tenant's `daily_cap`
    and the provider's daily limit; for a server whose provider is unknown (an own MTA, a
    small host), `ABL_WARMUP_CAP` stands in for the provider's limit."""
    limit = provider.daily if provider is not None else schedule.cap
    return max(1, min(daily_cap, limit))


@dataclass(frozen=True)
class ServerLimits:
    provider: str | None
    top: int  # the most a day, once warm
    per_minute: int | None


def server_limits(
    host: str,
    username: str,
    daily_cap: int,
    schedule: WarmupSchedule,
    provider_key: str | None = None,
) -> ServerLimits:
    """`provider_key`: the provider the registry stored at the server's check (from its host,
    CNAME chain or MX); without one (a row stored before it did), the host tells."""
    provider = provider_of(provider_key, host, username)
    return ServerLimits(
        provider=provider.key if provider else None,
        top=ramp_top(provider, daily_cap, schedule),
        per_minute=provider.per_minute if provider else None,
    )


def pace_spacing(per_minute: int) -> timedelta:
    return timedelta(seconds=60 / per_minute)


def minute_budget(pace_at: datetime | None, now: datetime, per_minute: int | None) -> int:
    """How many emails a server with a per-minute limit may take at `now`: one when its next
    slot has come, none before. Slots are `60 / per_minute` seconds apart, so no 60 seconds
    ever hold more than `per_minute` sends (Microsoft 365: 30 a minute)."""
    if per_minute is None:
        return 1 << 30
    return 1 if pace_at is None or pace_at <= now else 0


def next_pace(pace_at: datetime | None, now: datetime, taken: int, per_minute: int) -> datetime:
    """The server's next slot after `taken` sends at `now` (a missed slot is not saved up:
    an idle server does not earn a burst)."""
    start = now if pace_at is None or pace_at < now else pace_at
    return start + pace_spacing(per_minute) * taken


@dataclass(frozen=True)
class WarmupState:
    """Where a server stands at the start of `day`."""

    step: int
    day: date
    idle_days: int = 0


def fresh_state(day: date) -> WarmupState:
    return WarmupState(step=1, day=day, idle_days=0)


def ratio(part: int, whole: int) -> float | None:
    """`part / whole`, rounded for display; None when there is no whole to speak of."""
    return round(part / whole, 6) if whole > 0 else None


def climb_held(delivered: int, bounced: int, pause_ratio: float) -> bool:
    """Whether a day's hard bounces keep the server on its step: a rate above half the pause
    threshold is a warning well before the guard pauses, and more volume would make it worse."""
    return delivered > 0 and bounced > delivered * pause_ratio / 2


def close_day(
    state: WarmupState,
    delivered: int,
    allowance: int,
    schedule: WarmupSchedule,
    daily_cap: int,
    bounced: int = 0,
) -> WarmupState:
    """The state on the next day, given what the server delivered on `state.day` and how many
    of those emails bounced hard."""
    next_day = state.day + timedelta(days=1)
    if delivered <= 0:
        idle = state.idle_days + 1
        step = 1 if idle >= schedule.idle_reset_days else state.step
        return WarmupState(step=step, day=next_day, idle_days=idle)
    step = state.step
    # Climb only on proven volume: a barely used server does not move up, nor one whose
    # recipients bounced too often that day.
    held = climb_held(delivered, bounced, schedule.bounce_pause_ratio)
    if delivered >= allowance * schedule.advance_ratio and not held:
        step = min(step + 1, schedule.top_step(daily_cap))
    return WarmupState(step=step, day=next_day, idle_days=0)


def state_on(
    state: WarmupState,
    day: date,
    delivered: Mapping[date, int],
    allowances: Mapping[date, int],
    schedule: WarmupSchedule,
    daily_cap: int,
    bounced: Mapping[date, int] | None = None,
) -> WarmupState:
    """Fold every day from `state.day` up to (not including) `day`. Missing days delivered 0
    (and bounced 0)."""
    bounces = bounced or {}
    while state.day < day:
        allowance = allowances.get(state.day, schedule.allowance(state.step, daily_cap))
        state = close_day(
            state,
            delivered.get(state.day, 0),
            allowance,
            schedule,
            daily_cap,
            bounces.get(state.day, 0),
        )
    return state


def projection(
    state: WarmupState, days: int, schedule: WarmupSchedule, daily_cap: int
) -> list[tuple[date, int, int]]:
    """(day, step, allowance) for the next `days` days if the server sends its full allowance."""
    rows = []
    for _ in range(days):
        allowance = schedule.allowance(state.step, daily_cap)
        rows.append((state.day, state.step, allowance))
        state = close_day(state, allowance, allowance, schedule, daily_cap)
    return rows


# --- days, windows and pacing -------------------------------------------------------------


@dataclass(frozen=True)
class SendingWindow:
    """The hours of the tenant's local day in which a server may send."""

    time_zone: str = "UTC"
    start_hour: int = 0
    end_hour: int = 24

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def local_day(self, now: datetime) -> date:
        return now.astimezone(self.zone).date()

    def bounds(self, day: date) -> tuple[datetime, datetime]:
        start = datetime.combine(day, time(0), self.zone) + timedelta(hours=self.start_hour)
        end = datetime.combine(day, time(0), self.zone) + timedelta(hours=self.end_hour)
        return start.astimezone(UTC), end.astimezone(UTC)

    def next_day_start(self, now: datetime) -> datetime:
        return self.bounds(self.local_day(now) + timedelta(days=1))[0]


def jitter(key: str, spread: float) -> float:
    """A stable pseudo-random offset in [0, spread): the same slot always gets the same one."""
    digest = hashlib.sha256(key.encode()).digest()
    return spread * int.from_bytes(digest[:8], "big") / 2**64


def slot_time(
    window: SendingWindow, day: date, allowance: int, index: int, jitter_key: str
) -> datetime:
    """When the `index`-th send (0-based) of a day may leave: even slots with jitter inside."""
    start, end = window.bounds(day)
    interval = (end - start) / max(allowance, 1)
    offset = jitter(f"{jitter_key}:{day}:{index}", interval.total_seconds() * 0.8)
    return start + interval * index + timedelta(seconds=offset)


def sendable_now(
    *,
    now: datetime,
    window: SendingWindow,
    allowance: int,
    used_today: int,
    rolling_used: int,
    pacing: bool,
    jitter_key: str,
) -> int:
    """How many more emails a server may take at `now`."""
    remaining = min(allowance - used_today, allowance - rolling_used)
    if remaining <= 0:
        return 0
    day = window.local_day(now)
    start, end = window.bounds(day)
    if not (start <= now < end):
        return 0
    if not pacing:
        return remaining
    due = 0
    while (
        due < remaining and slot_time(window, day, allowance, used_today + due, jitter_key) <= now
    ):
        due += 1
    return due


def next_send_time(
    *,
    now: datetime,
    window: SendingWindow,
    allowance: int,
    used_today: int,
    pacing: bool,
    jitter_key: str,
) -> datetime:
    day = window.local_day(now)
    start, end = window.bounds(day)
    if used_today >= allowance or now >= end:
        return window.next_day_start(now)
    if not pacing:
        return max(now, start)
    return max(now, slot_time(window, day, allowance, used_today, jitter_key))


def rolling_used(usage_by_hour: Mapping[datetime, int], now: datetime) -> int:
    """Sends in the last 24 hours, counted by hour buckets.

    The bucket that holds `now - 24h` is counted whole, so the figure is never below the truth.
    """
    oldest = rolling_window_start(now)
    return sum(used for hour, used in usage_by_hour.items() if hour >= oldest)


def rolling_window_start(now: datetime) -> datetime:
    """The first hour bucket the rolling 24-hour count includes."""
    return hour_bucket(now - timedelta(hours=24))


def hour_bucket(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


# --- even share ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLoad:
    server_id: str
    used_today: int
    can_take: int


@dataclass(frozen=True)
class Candidate:
    server_id: str
    tenant_id: str
    active: bool
    parked_until: datetime | None = None


def eligible(candidates: Sequence[Candidate], tenant_id: str, now: datetime) -> list[str]:
    """The servers that may carry `tenant_id`'s emails now: its own, active, not parked.

    Servers are never pooled: another tenant's server is never eligible, whatever its state.
    """
    return [
        c.server_id
        for c in candidates
        if c.tenant_id == tenant_id
        and c.active
        and (c.parked_until is None or c.parked_until <= now)
    ]


def plan_share(servers: Sequence[ServerLoad], emails: int, rng: random.Random) -> dict[str, int]:
    """Give each email to the server that has sent the fewest today, ties broken at random."""
    heap = [
        (s.used_today, rng.random(), s.server_id, s.can_take) for s in servers if s.can_take > 0
    ]
    heapq.heapify(heap)
    plan: dict[str, int] = {}
    while emails > 0 and heap:
        used, _, server_id, can_take = heapq.heappop(heap)
        plan[server_id] = plan.get(server_id, 0) + 1
        emails -= 1
        if can_take > 1:
            heapq.heappush(heap, (used + 1, rng.random(), server_id, can_take - 1))
    return plan


def avoid_previous_server(
    previous: Sequence[ServerT | None], assigned: Sequence[ServerT]
) -> list[ServerT]:
    """Swap assignments so that a retried email leaves through another server when one of
    this batch's servers is free to trade; the share per server stays the same."""
    result = list(assigned)
    for i, last in enumerate(previous):
        if last is None or result[i] != last:
            continue
        for j in range(len(result)):
            if result[j] != last and previous[j] != result[i]:
                result[i], result[j] = result[j], result[i]
                break
    return result


# --- retries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_seconds: float = 60.0
    cap_seconds: float = 3600.0

    def delay(self, attempt: int, rng: random.Random) -> timedelta:
        """Exponential backoff with full jitter after the `attempt`-th failure (1-based)."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** (attempt - 1))
        return timedelta(seconds=ceiling / 2 + rng.uniform(0, ceiling / 2))


# --- capacity -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CapacityAdvice:
    monthly_emails: int
    days: int
    per_server_first_month: int
    per_server_steady_month: int
    minimum_servers: int
    recommended_servers: int
    steady_state_servers: int


def capacity(
    monthly_emails: int,
    schedule: WarmupSchedule,
    *,
    days: int = 30,
    headroom: float = 0.25,
    daily_cap: int | None = None,
) -> CapacityAdvice:
    """Servers a tenant needs for `monthly_emails`, counting the warmup of fresh servers."""
    cap = min(schedule.cap, daily_cap or schedule.cap)
    first = sum(a for _, _, a in projection(fresh_state(date(2000, 1, 1)), days, schedule, cap))
    steady = cap * days
    need = max(monthly_emails, 0)
    return CapacityAdvice(
        monthly_emails=need,
        days=days,
        per_server_first_month=first,
        per_server_steady_month=steady,
        minimum_servers=math.ceil(need / first) if need else 0,
        recommended_servers=math.ceil(need * (1 + headroom) / first) if need else 0,
        steady_state_servers=math.ceil(need / steady) if need else 0,
    )


# --- bounce-rate guard ------------------------------------------------------------------------


@dataclass(frozen=True)
class BounceGuard:
    window: int = 200
    pause_ratio: float = 0.05
    complaint_ratio: float = 0.001
    min_sent: int = 20


def bounce_verdict(sent: int, hard_bounces: int, complaints: int, guard: BounceGuard) -> str | None:
    """Why a server must be paused, or None. `sent` counts its last `guard.window` sent emails
    (at most), and the bounces and complaints among them."""
    if sent < min(guard.min_sent, guard.window) or sent <= 0:
        return None
    if hard_bounces / sent > guard.pause_ratio:
        return (
            f"hard bounces {hard_bounces} of the last {sent} sent "
            f"({hard_bounces / sent:.1%} > {guard.pause_ratio:.1%})"
        )
    if complaints / sent > guard.complaint_ratio:
        return (
            f"complaints {complaints} of the last {sent} sent "
            f"({complaints / sent:.2%} > {guard.complaint_ratio:.2%})"
        )
    return None
