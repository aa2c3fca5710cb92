"""Provider limits: detection from the SMTP host, the effective daily cap, per-minute spacing;
tables and hypothesis properties for the pure rules, then the dispatcher and the warmup API on
servers whose host names a provider."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import update

from services.registry import changes
from services.registry.models import SmtpServer, SmtpServerCreate
from services.scheduler import domain
from services.scheduler.domain import WarmupSchedule
from shared.db import table_of
from shared.providers import PROVIDERS, Provider, detect
from shared.settings import Settings
from tests.conftest import Api, running
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, dispatcher, emails, published_jobs, warm_up

SCHEDULE = WarmupSchedule()
NOW = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("host", "username", "expected"),
    [
        ("smtp.gmail.com", "sales@gmail.com", "gmail"),
        ("smtp.gmail.com", "sales@googlemail.com", "gmail"),
        ("SMTP.Gmail.com.", "Sales@GMAIL.com", "gmail"),
        ("smtp.gmail.com", "sales@acme.com", "google_workspace"),
        ("smtp.office365.com", "sales@acme.com", "office365"),
        ("smtp-mail.outlook.com", "me@outlook.com", "outlook"),
        ("smtp.zoho.com", "me@acme.com", "zoho"),
        ("smtp.zoho.eu", "me@acme.com", "zoho"),
        ("smtppro.zoho.in", "me@acme.com", "zoho"),
        ("smtp.mail.yahoo.com", "me@yahoo.com", "yahoo"),
        ("smtp.mail.me.com", "me@icloud.com", "icloud"),
        ("smtp.fastmail.com", "me@fastmail.com", "fastmail"),
        ("mail.acme.com", "me@acme.com", None),
        ("localhost", "alice@example.com", None),
        # Look-alikes are not the provider: only the exact host (or Zoho's own domains).
        ("smtp.gmail.com.attacker.net", "me@gmail.com", None),
        ("smtp.zoho.com.attacker.net", "me@acme.com", None),
        ("mail.zoho.com", "me@acme.com", None),
    ],
)
def test_provider_is_detected_from_the_host(host: str, username: str, expected: str | None) -> None:
    provider = detect(host, username)
    assert (provider.key if provider else None) == expected


@pytest.mark.parametrize(
    ("host", "username", "daily_cap", "top", "per_minute"),
    [
        ("smtp.gmail.com", "a@gmail.com", 10_000, 500, None),
        ("smtp.gmail.com", "a@acme.com", 10_000, 2000, None),
        ("smtp.gmail.com", "a@acme.com", 800, 800, None),
        ("smtp.office365.com", "a@acme.com", 10_000, 10_000, 30),
        ("smtp.office365.com", "a@acme.com", 3000, 3000, 30),
        ("smtp-mail.outlook.com", "a@outlook.com", 500, 300, 30),
        ("smtp.mail.yahoo.com", "a@yahoo.com", 10_000, 500, None),
        ("smtp.mail.me.com", "a@icloud.com", 10_000, 1000, None),
        # An unknown server stops where ABL_WARMUP_CAP says, unless daily_cap is lower.
        ("mail.acme.com", "a@acme.com", 10_000, 500, None),
        ("mail.acme.com", "a@acme.com", 120, 120, None),
    ],
)
def test_effective_cap_is_the_lowest_of_daily_cap_and_provider(
    host: str, username: str, daily_cap: int, top: int, per_minute: int | None
) -> None:
    limits = domain.server_limits(host, username, daily_cap, SCHEDULE)
    assert (limits.top, limits.per_minute) == (top, per_minute)
    # The ramp climbs by the same steps and ends exactly at the effective cap.
    steps = SCHEDULE.steps(limits.top)
    assert steps[-1] == top
    assert steps[:3] == [min(20, top), min(26, top), min(34, top)][: len(steps[:3])]


def test_microsoft_365_ramp_reaches_10000_after_the_500_table() -> None:
    steps = SCHEDULE.steps(10_000)
    assert steps[:13] == [20, 26, 34, 45, 59, 77, 101, 132, 172, 224, 292, 380, 494]
    assert steps[-1] == 10_000
    assert all(b > a for a, b in itertools.pairwise(steps))
    assert SCHEDULE.allowance(13, 10_000) == 494  # warmup still governs a fresh server


@given(
    provider=st.sampled_from([None, *PROVIDERS.values()]),
    daily_cap=st.integers(1, 10_000),
    cap=st.integers(1, 500),
)
def test_ramp_top_never_exceeds_any_limit(
    provider: Provider | None, daily_cap: int, cap: int
) -> None:
    schedule = WarmupSchedule(cap=cap)
    top = domain.ramp_top(provider, daily_cap, schedule)
    limit = provider.daily if provider else cap
    assert top == min(daily_cap, limit)
    assert all(a <= top for a in schedule.steps(top))


@settings(max_examples=200)
@given(
    per_minute=st.integers(1, 120),
    gaps=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=300),
)
def test_spacing_never_lets_a_minute_hold_more_than_the_limit(
    per_minute: int, gaps: list[float]
) -> None:
    # Ticks at arbitrary moments (a wake-up may come at any time); at each, the server takes
    # what minute_budget allows.
    now, pace_at = NOW, None
    sends: list[datetime] = []
    for gap in gaps:
        now += timedelta(seconds=gap)
        taken = domain.minute_budget(pace_at, now, per_minute)
        if taken:
            sends.extend([now] * taken)
            pace_at = domain.next_pace(pace_at, now, taken, per_minute)
    for i, start in enumerate(sends):
        in_window = [t for t in sends[i:] if t < start + timedelta(seconds=60)]
        assert len(in_window) <= per_minute


def test_no_per_minute_limit_means_no_spacing() -> None:
    assert domain.minute_budget(NOW + timedelta(hours=1), NOW, None) >= 10_000


def test_an_idle_server_earns_no_burst() -> None:
    # Idle for an hour: still one slot now, the next one 2 s later for 30 a minute.
    pace = domain.next_pace(NOW - timedelta(hours=1), NOW, 1, 30)
    assert pace == NOW + timedelta(seconds=2)
    assert domain.minute_budget(pace, NOW + timedelta(seconds=1), 30) == 0
    assert domain.minute_budget(pace, NOW + timedelta(seconds=2), 30) == 1


# --- through the dispatcher and the API --------------------------------------------------


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings, combined=True) as api:
        yield api


async def set_host(api: Api, server_id: str, host: str, username: str) -> None:
    # The provider's real host cannot be dialled from a test: the server is checked on the
    # local SMTP server and then pointed at the provider's host name, as the registry stores it.
    table = table_of(SmtpServer)
    async with api.app.state.sessions() as session, session.begin():
        await session.exec(
            update(table)
            .where(table.c.id == uuid.UUID(server_id))
            .values(host=host, username=username, daily_cap=10_000)
        )
        # As the registry's own Core updates do: the other services' copies hear of it.
        await changes.server_changed(session, uuid.UUID(server_id))
    await api.copies_caught_up()


async def test_microsoft_365_server_sends_30_a_minute_and_shows_its_limits(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    server_id, *others = await add_servers(app, tenant, starttls_server)
    for other in others:
        paused = await app.client.post(f"/v1/servers/{other}/pause", headers=tenant)
        assert paused.status_code == 200
    await set_host(app, server_id, "smtp.office365.com", "sales@acme.com")
    await warm_up(app, [server_id], step=30)
    await app.client.post("/v1/messages", json=emails(100), headers=tenant)

    start = datetime.now(UTC)
    for second in range(0, 61):
        await dispatcher(app).tick(start + timedelta(seconds=second))
    jobs = published_jobs(app)
    # One slot every 2 s: 31 ticks at 0, 2, ..., 60 s; at most 30 in any 60 s.
    assert len(jobs) == 31

    warmup = (await app.client.get(f"/v1/servers/{server_id}/warmup", headers=tenant)).json()
    assert (warmup["provider"], warmup["daily_limit"], warmup["per_minute_limit"]) == (
        "office365",
        10_000,
        30,
    )
    assert warmup["allowance_today"] == 10_000


async def test_workspace_server_climbs_past_500_and_gmail_does_not(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await set_host(app, servers[0], "smtp.gmail.com", "sales@acme.com")
    await set_host(app, servers[1], "smtp.gmail.com", "sales@gmail.com")
    await warm_up(app, servers, step=40)
    workspace, gmail, unknown = [
        (await app.client.get(f"/v1/servers/{s}/warmup", headers=tenant)).json() for s in servers
    ]
    assert (workspace["provider"], workspace["allowance_today"]) == ("google_workspace", 2000)
    assert (gmail["provider"], gmail["allowance_today"]) == ("gmail", 500)
    assert (unknown["provider"], unknown["allowance_today"]) == (None, 500)
    for _ in range(3):
        accepted = await app.client.post("/v1/messages", json=emails(1000), headers=tenant)
        assert accepted.status_code == 202
    await dispatcher(app).tick()
    by_server: dict[str, int] = {}
    for job in published_jobs(app):
        by_server[str(job.server_id)] = by_server.get(str(job.server_id), 0) + 1
    assert by_server == {servers[0]: 2000, servers[1]: 500, servers[2]: 500}


@pytest.mark.parametrize(
    ("body", "daily_cap"),
    [
        ({"preset": "office365", "username": "a@acme.com"}, 10_000),
        ({"preset": "google_workspace", "username": "a@acme.com"}, 2000),
        ({"preset": "gmail", "username": "a@gmail.com"}, 500),
        ({"preset": "outlook", "username": "a@outlook.com"}, 300),
        ({"preset": "icloud", "username": "a@icloud.com"}, 1000),
        ({"host": "mail.acme.com", "port": 587, "security": "starttls", "username": "a"}, 500),
        ({"preset": "office365", "username": "a@acme.com", "daily_cap": 700}, 700),
    ],
)
def test_a_server_added_without_daily_cap_gets_its_providers_limit(
    body: dict[str, object], daily_cap: int
) -> None:
    server = SmtpServerCreate.model_validate({"password": "x", "from_email": "a@acme.com", **body})
    assert server.daily_cap == daily_cap
