"""Every service's /metrics passes promtool-style lint rules, and the state gauges follow the
database."""

from __future__ import annotations

import re
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.scheduler import stats
from shared.settings import Settings
from shared.timeutil import utcnow
from tests.conftest import Api, running
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, emails

NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# An address, a tenant or a server as a label would make a series per customer.
HIGH_CARDINALITY = {
    "email",
    "address",
    "to",
    "tenant",
    "tenant_id",
    "server",
    "server_id",
    "host",
    "username",
    "path",
}
BAD_UNITS = ("_ms", "_milliseconds", "_minutes", "_hours", "_kilobytes", "_megabytes")


def lint(exposition: str) -> list[str]:
    problems = []
    for family in text_string_to_metric_families(exposition):
        name = family.name
        if not name.startswith("abl_"):
            continue
        if not NAME.match(name):
            problems.append(f"{name}: not snake_case")
        if not family.documentation:
            problems.append(f"{name}: no HELP")
        if family.type == "counter" and name.endswith("_total"):
            problems.append(f"{name}: counter declared with _total twice")
        if family.type != "counter" and name.endswith("_total"):
            problems.append(f"{name}: only counters end in _total")
        if any(name.endswith(unit) or f"{unit}_" in name for unit in BAD_UNITS):
            problems.append(f"{name}: not in base units")
        if ("duration" in name or "latency" in name) and not name.endswith(
            ("_seconds", "_seconds_created")
        ):
            problems.append(f"{name}: a duration must be in seconds")
        for sample in family.samples:
            bad = HIGH_CARDINALITY & set(sample.labels)
            if bad:
                problems.append(f"{name}: high-cardinality label {sorted(bad)}")
            if family.type == "counter" and not (
                sample.name.endswith("_total") or sample.name.endswith("_created")
            ):
                problems.append(f"{sample.name}: counter sample without _total")
        if family.type == "histogram":
            les = [s.labels.get("le") for s in family.samples if s.name.endswith("_bucket")]
            if les and "+Inf" not in les:
                problems.append(f"{name}: histogram without +Inf bucket")
    return problems


async def test_every_service_exposes_linted_metrics(
    settings: Settings, starttls_server: SmtpTestServer
) -> None:
    async with running(settings, combined=True) as api:
        tenant = await api.new_tenant()
        await add_servers(api, tenant, starttls_server)
        await api.client.post("/v1/messages", json=emails(3), headers=tenant)
        await api.client.get("/v1/servers", headers=tenant)
        await api.app.state.dispatcher.tick()
        exposition = (await api.client.get("/metrics")).text
    assert lint(exposition) == []
    names = {f.name for f in text_string_to_metric_families(exposition)}
    for expected in (
        "abl_http_requests",
        "abl_http_request_duration_seconds",
        "abl_server_verifications",
        "abl_send_jobs_published",
        "abl_publish_confirm_duration_seconds",
        "abl_emails",
        "abl_servers",
        "abl_servers_warmup_step",
        "abl_dead_lettered",
        "abl_sender_outcomes",
        "abl_smtp_replies",
        "abl_delivery_duration_seconds",
        "abl_sender_jobs_in_flight",
        "abl_reservations_refused",
    ):
        assert expected in names, expected


def test_lint_catches_what_it_should() -> None:
    bad = (
        "# HELP abl_latency_ms Latency.\n# TYPE abl_latency_ms gauge\nabl_latency_ms 3\n"
        "# HELP abl_sent Sent.\n# TYPE abl_sent counter\n"
        'abl_sent_total{email="a@b.c"} 1\n'
    )
    problems = lint(bad)
    assert any("base units" in p for p in problems)
    assert any("high-cardinality" in p for p in problems)


def sample(exposition: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name}{labels} not exported")


async def test_state_gauges_follow_the_database(
    api_combined: Api, starttls_server: SmtpTestServer
) -> None:
    api = api_combined
    tenant = await api.new_tenant()
    servers = await add_servers(api, tenant, starttls_server)
    await api.client.post(f"/v1/servers/{servers[0]}/pause", headers=tenant)
    await api.client.post("/v1/messages", json=emails(7), headers=tenant)
    await api.app.state.dispatcher.tick()
    await stats.refresh(api.app.state.sessions, api.app.state.bus, api.settings, utcnow())
    exposition = (await api.client.get("/metrics")).text
    assert sample(exposition, "abl_emails", status="scheduled") == 7
    assert sample(exposition, "abl_servers", status="active") == 2
    assert sample(exposition, "abl_servers", status="paused") == 1
    assert sample(exposition, "abl_servers_warmup_step", step="1") == 2
    assert sample(exposition, "abl_broker_queue_messages", queue="send-jobs") == 7


@pytest.fixture
async def api_combined(settings: Settings) -> Any:
    async with running(settings, combined=True) as api:
        yield api
