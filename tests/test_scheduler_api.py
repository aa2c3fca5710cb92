"""The scheduler end to end in one process: emails in, warmup, even share, jobs out, results
back; on SQLite and PostgreSQL, against servers checked on a real SMTP server."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from services.registry.models import SmtpServer
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.models import ServerWarmup
from shared.broker import InProcessBus
from shared.messages import Outcome, SendJob, SendResult
from shared.settings import Settings
from shared.timeutil import utcnow
from tests.conftest import ACCOUNTS, Api, running
from tests.support.smtp import SmtpTestServer


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings, combined=True) as api:
        yield api


async def add_servers(
    api: Api,
    tenant: dict[str, str],
    smtp: SmtpTestServer,
    accounts: dict[str, str] = ACCOUNTS,
    **extra: Any,
) -> list[str]:
    """One STARTTLS server on `smtp` per account, through the API; their ids in order."""
    ids = []
    for login, password in accounts.items():
        body = {
            "host": "localhost",
            "port": smtp.port,
            "security": "starttls",
            "username": login,
            "password": password,
            "from_email": login,
            **extra,
        }
        response = await api.client.post("/v1/servers", json=body, headers=tenant)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    await api.copies_caught_up()
    return ids


async def warm_up(api: Api, server_ids: list[str], step: int = 14) -> None:
    async with api.app.state.sessions() as session, session.begin():
        for server_id in server_ids:
            server = await session.get(SmtpServer, uuid.UUID(server_id))
            assert server is not None
            session.add(
                ServerWarmup(
                    server_id=server.id,
                    tenant_id=server.tenant_id,
                    step=step,
                    state_day=utcnow().date(),
                )
            )


def emails(count: int, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"to": f"lead{i}@example.org", "subject": f"Hello {i}", "text": "Hi there", **extra}
            for i in range(count)
        ]
    }


def published_jobs(api: Api) -> list[SendJob]:
    bus: InProcessBus = api.app.state.bus
    queue = bus._queue(api.settings.send_jobs_queue)  # created on first use
    jobs = []
    while not queue.empty():
        jobs.append(SendJob.model_validate_json(queue.get_nowait().body))
    return jobs


def dispatcher(api: Api) -> Dispatcher:
    result: Dispatcher = api.app.state.dispatcher
    return result


async def statuses(api: Api, tenant: dict[str, str]) -> Counter[str]:
    page = await api.client.get("/v1/messages", params={"limit": 500}, headers=tenant)
    return Counter(item["status"] for item in page.json()["items"])


async def test_three_warm_servers_and_30_emails_send_10_each(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await warm_up(app, servers)
    accepted = await app.client.post("/v1/messages", json=emails(30), headers=tenant)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["queued"] == 30
    await dispatcher(app).tick()
    jobs = published_jobs(app)
    assert sorted(Counter(str(job.server_id) for job in jobs).values()) == [10, 10, 10]
    assert {str(job.server_id) for job in jobs} == set(servers)
    assert len({job.email_id for job in jobs}) == 30
    assert (await statuses(app, tenant)) == {"scheduled": 30}


async def test_three_fresh_servers_and_100_emails_send_20_each_and_keep_40_in_order(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    await add_servers(app, tenant, starttls_server)
    ids = (await app.client.post("/v1/messages", json=emails(100), headers=tenant)).json()["ids"]
    await dispatcher(app).tick()
    await dispatcher(app).tick()  # a second tick today finds no allowance left
    jobs = published_jobs(app)
    assert sorted(Counter(job.server_id for job in jobs).values()) == [20, 20, 20]
    # The oldest 60 left; the newest 40 wait, in order, for the next days.
    assert {str(job.email_id) for job in jobs} == set(ids[:60])
    queued = await app.client.get(
        "/v1/messages", params={"status": "queued", "limit": 500}, headers=tenant
    )
    assert [item["id"] for item in queued.json()["items"]] == ids[60:]

    warmup = await app.client.get(f"/v1/servers/{jobs[0].server_id}/warmup", headers=tenant)
    body = warmup.json()
    assert (
        body["step"],
        body["allowance_today"],
        body["reserved_today"],
        body["remaining_today"],
    ) == (1, 20, 20, 0)
    assert [day["allowance"] for day in body["projection"][:3]] == [20, 26, 34]
    assert len(body["projection"]) == 30


async def test_a_tenant_never_uses_another_tenants_servers(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    first, second = await app.new_tenant("first"), await app.new_tenant("second")
    first_servers = await add_servers(app, first, starttls_server)
    second_servers = await add_servers(app, second, starttls_server)
    await warm_up(app, first_servers + second_servers)
    first_ids = set(
        (await app.client.post("/v1/messages", json=emails(40), headers=first)).json()["ids"]
    )
    second_ids = set(
        (await app.client.post("/v1/messages", json=emails(25), headers=second)).json()["ids"]
    )
    await dispatcher(app).tick()
    for job in published_jobs(app):
        expected = first_servers if str(job.email_id) in first_ids else second_servers
        assert str(job.server_id) in expected
        assert str(job.email_id) in first_ids | second_ids
    other = await app.client.get(f"/v1/servers/{first_servers[0]}/warmup", headers=second)
    assert other.status_code == 404


async def test_no_active_server_still_queues_and_says_so(app: Api) -> None:
    tenant = await app.new_tenant()
    response = await app.client.post("/v1/messages", json=emails(2), headers=tenant)
    assert response.status_code == 202
    assert response.json()["active_servers"] == 0
    assert "No active server" in response.json()["warning"]
    await dispatcher(app).tick()
    assert published_jobs(app) == []
    assert (await statuses(app, tenant)) == {"queued": 2}


async def test_paused_server_gets_no_jobs(app: Api, starttls_server: SmtpTestServer) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await warm_up(app, servers)
    await app.client.post(f"/v1/servers/{servers[0]}/pause", headers=tenant)
    await app.client.post("/v1/messages", json=emails(10), headers=tenant)
    await dispatcher(app).tick()
    jobs = published_jobs(app)
    assert len(jobs) == 10
    assert str(servers[0]) not in {str(job.server_id) for job in jobs}


async def test_idempotency_key_returns_the_first_ids(app: Api) -> None:
    tenant = await app.new_tenant()
    item = {"to": "a@example.org", "subject": "s", "text": "t", "idempotency_key": "k-1"}
    first = await app.client.post("/v1/messages", json=item, headers=tenant)
    again = await app.client.post("/v1/messages", json={"messages": [item]}, headers=tenant)
    assert first.json()["ids"] == again.json()["ids"]
    assert (again.json()["queued"], again.json()["duplicates"]) == (0, 1)
    other = await app.new_tenant("other")
    theirs = await app.client.post("/v1/messages", json=item, headers=other)
    assert theirs.json()["ids"] != first.json()["ids"]
    assert (await statuses(app, tenant)) == {"queued": 1}


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"to": "not-an-address"}, "body.messages.3.to"),
        ({"subject": "Hi\r\nBcc: all@example.org"}, "body.messages.3.subject"),
        ({"headers": {"X-Campaign": "a\nb"}}, "body.messages.3.headers"),
        ({"headers": {"Bcc": "x@example.org"}}, "body.messages.3.headers"),
        ({"headers": {"Bad Name": "x"}}, "body.messages.3.headers"),
        ({"text": None, "html": None}, "body.messages.3"),
        ({"text": "x" * (512 * 1024 + 1)}, "body.messages.3.text"),
    ],
)
async def test_a_bad_item_names_its_index_and_nothing_is_queued(
    app: Api, bad: dict[str, Any], field: str
) -> None:
    tenant = await app.new_tenant()
    batch = emails(5)
    batch["messages"][3].update(bad)
    response = await app.client.post("/v1/messages", json=batch, headers=tenant)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert field in [error["field"] for error in response.json()["errors"]]
    assert (await statuses(app, tenant)) == {}


async def test_batch_size_is_bounded(app: Api) -> None:
    tenant = await app.new_tenant()
    response = await app.client.post("/v1/messages", json=emails(1001), headers=tenant)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body.messages"
    empty = await app.client.post("/v1/messages", json={"messages": []}, headers=tenant)
    assert empty.status_code == 422


async def test_cancel_and_get(app: Api) -> None:
    tenant = await app.new_tenant()
    email_id = (
        await app.client.post("/v1/messages", json=emails(1)["messages"][0], headers=tenant)
    ).json()["ids"][0]
    got = await app.client.get(f"/v1/messages/{email_id}", headers=tenant)
    assert got.json()["status"] == "queued"
    assert got.json()["attempts"] == 0
    canceled = await app.client.post(f"/v1/messages/{email_id}/cancel", headers=tenant)
    assert canceled.json()["status"] == "canceled"
    again = await app.client.post(f"/v1/messages/{email_id}/cancel", headers=tenant)
    assert again.status_code == 409
    other = await app.new_tenant("other")
    assert (await app.client.get(f"/v1/messages/{email_id}", headers=other)).status_code == 404


def result_for(
    job: SendJob,
    outcome: Outcome,
    *,
    data_completed: bool,
    problem: str | None = None,
    code: int | None = 250,
) -> SendResult:
    return SendResult(
        job_id=job.job_id,
        email_id=job.email_id,
        tenant_id=job.tenant_id,
        server_id=job.server_id,
        attempt=job.attempt,
        outcome=outcome,
        smtp_code=code,
        smtp_reply="2.0.0 OK" if outcome is Outcome.sent else "4.4.1 try later",
        data_completed=data_completed,
        server_problem=problem,
        finished_at=utcnow(),
    )


async def test_results_update_emails_counters_and_give_back_reservations(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await app.client.post("/v1/messages", json=emails(6), headers=tenant)
    await dispatcher(app).tick()
    jobs = published_jobs(app)
    applier = app.app.state.result_applier
    sent, retried, failed, unknown = jobs[0], jobs[1], jobs[2], jobs[3]
    assert await applier.apply(result_for(sent, Outcome.sent, data_completed=True))
    assert not await applier.apply(result_for(sent, Outcome.sent, data_completed=True))
    assert await applier.apply(result_for(retried, Outcome.retry, data_completed=False, code=421))
    assert await applier.apply(result_for(failed, Outcome.failed, data_completed=True, code=550))
    assert await applier.apply(result_for(unknown, Outcome.unknown, data_completed=True, code=None))

    async def status_of(job: SendJob) -> dict[str, Any]:
        response = await app.client.get(f"/v1/messages/{job.email_id}", headers=tenant)
        body: dict[str, Any] = response.json()
        return body

    assert (await status_of(sent))["status"] == "sent"
    assert (await status_of(failed))["status"] == "failed"
    assert (await status_of(failed))["last_smtp_code"] == 550
    assert (await status_of(unknown))["status"] == "unknown"
    requeued = await status_of(retried)
    assert (requeued["status"], requeued["attempts"]) == ("queued", 1)
    assert requeued["not_before"] > utcnow().isoformat()

    reserved = {
        s: (await app.client.get(f"/v1/servers/{s}/warmup", headers=tenant)).json() for s in servers
    }
    assert sum(r["reserved_today"] for r in reserved.values()) == 5  # 6 reserved, 1 given back
    assert sum(r["sent_today"] for r in reserved.values()) == 1


async def test_quota_reply_parks_the_server_and_the_email_goes_elsewhere(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await warm_up(app, servers)
    await app.client.post("/v1/messages", json=emails(3), headers=tenant)
    await dispatcher(app).tick()
    job = published_jobs(app)[0]
    await app.app.state.result_applier.apply(
        result_for(job, Outcome.retry, data_completed=False, problem="quota", code=550)
    )
    await dispatcher(app).tick()
    (again,) = published_jobs(app)
    assert again.email_id == job.email_id
    assert again.server_id != job.server_id
    parked = await app.client.get(f"/v1/servers/{job.server_id}/warmup", headers=tenant)
    assert parked.json()["parked_until"] is not None


async def test_a_job_never_confirmed_is_published_again_after_its_lease(
    settings: Settings, starttls_server: SmtpTestServer
) -> None:
    """The state a scheduler killed between commit and publish leaves: scheduled, unpublished."""

    class DeadBus(InProcessBus):
        async def publish(
            self, queue: str, body: bytes, *, message_id: str, expires_in: float | None = None
        ) -> None:
            raise ConnectionError("the process died here")

    async with running(settings, combined=True) as app:
        tenant = await app.new_tenant()
        await add_servers(app, tenant, starttls_server)
        ids = (await app.client.post("/v1/messages", json=emails(5), headers=tenant)).json()["ids"]
        crashed = Dispatcher(settings, app.app.state.sessions, DeadBus())
        report = await crashed.tick()
        assert (report.dispatched, report.publish_failures) == (5, 5)
        assert (await statuses(app, tenant)) == {"scheduled": 5}

        survivor = dispatcher(app)
        assert (await survivor.tick()).republished == 0  # the lease has not run out yet
        later = utcnow() + timedelta(seconds=settings.publish_lease_seconds + 1)
        assert (await survivor.tick(later)).republished == 5
        jobs = published_jobs(app)
        assert sorted(str(job.email_id) for job in jobs) == sorted(ids)
        assert (await survivor.tick(later + timedelta(minutes=5))).republished == 0


async def test_capacity_and_sending_profile(app: Api) -> None:
    tenant = await app.new_tenant()
    capacity = await app.client.get(
        "/v1/capacity", params={"monthly_emails": 20000}, headers=tenant
    )
    assert capacity.json()["recommended_servers"] == 3
    profile = await app.client.put(
        "/v1/sending-profile",
        headers=tenant,
        json={"time_zone": "Europe/Paris", "start_hour": 9, "end_hour": 17},
    )
    assert profile.status_code == 200, profile.text
    bad = await app.client.put(
        "/v1/sending-profile",
        headers=tenant,
        json={"time_zone": "Mars/Olympus", "start_hour": 9, "end_hour": 17},
    )
    assert bad.status_code == 422
    assert (await app.client.get("/v1/sending-profile", headers=tenant)).json()[
        "time_zone"
    ] == "Europe/Paris"


async def test_canceling_a_scheduled_email_gives_its_reservation_back(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    (server_id, *others) = await add_servers(app, tenant, starttls_server)
    for other in others:  # one server, so the reservation is easy to follow
        await app.client.post(f"/v1/servers/{other}/pause", headers=tenant)
    ids = (await app.client.post("/v1/messages", json=emails(2), headers=tenant)).json()["ids"]
    await dispatcher(app).tick()
    url = f"/v1/servers/{server_id}/warmup"
    assert (await app.client.get(url, headers=tenant)).json()["reserved_today"] == 2
    canceled = await app.client.post(f"/v1/messages/{ids[0]}/cancel", headers=tenant)
    assert canceled.json()["status"] == "canceled"
    # Its job is out: the reservation is kept until the sender holding it reports.
    assert (await app.client.get(url, headers=tenant)).json()["reserved_today"] == 2
    again = await app.client.post(f"/v1/messages/{ids[0]}/cancel", headers=tenant)
    assert again.status_code == 409
    # A redelivered copy is not sendable any more.
    jobs = published_jobs(app)
    check = await app.client.post(
        "/internal/v1/jobs/sendable",
        json={"jobs": [{"email_id": str(job.email_id), "job_id": str(job.job_id)} for job in jobs]},
        headers=app.internal(),
    )
    assert check.json()["sendable"] == [
        str(job.job_id) for job in jobs if str(job.email_id) != ids[0]
    ]
    # The sender reports it "canceled before sending": the reservation comes back, once.
    (job,) = [job for job in jobs if str(job.email_id) == ids[0]]
    skipped = result_for(job, Outcome.failed, data_completed=False, code=None)
    applier = app.app.state.result_applier
    assert await applier.apply_many([skipped, skipped]) == [True, False]
    assert (await app.client.get(url, headers=tenant)).json()["reserved_today"] == 1
    assert (await statuses(app, tenant))["canceled"] == 1


async def test_a_batch_of_results_applies_each_once_and_sums_the_counters(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await warm_up(app, servers)
    await app.client.post("/v1/messages", json=emails(9), headers=tenant)
    await dispatcher(app).tick()
    jobs = published_jobs(app)
    results = [result_for(job, Outcome.sent, data_completed=True) for job in jobs[:6]]
    results += [result_for(job, Outcome.retry, data_completed=False) for job in jobs[6:]]
    applied = await app.app.state.result_applier.apply_many(results + results[:2])
    assert applied == [True] * 9 + [False, False]  # the repeats in the batch change nothing
    warmups = [
        (await app.client.get(f"/v1/servers/{s}/warmup", headers=tenant)).json() for s in servers
    ]
    assert sum(w["sent_today"] for w in warmups) == 6
    assert sum(w["reserved_today"] for w in warmups) == 6  # 9 reserved, 3 given back
    assert sum(w["rolling_24h_used"] for w in warmups) == 6


async def test_a_result_reported_directly_while_the_broker_is_away_is_applied_once(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    await add_servers(app, tenant, starttls_server)
    await app.client.post("/v1/messages", json=emails(2), headers=tenant)
    await dispatcher(app).tick()
    jobs = published_jobs(app)
    report = {
        "results": [
            result_for(job, Outcome.sent, data_completed=True).model_dump(mode="json")
            for job in jobs
        ]
    }
    first = await app.client.post("/internal/v1/results", json=report, headers=app.internal())
    assert first.json() == {"applied": [True, True]}
    assert (await statuses(app, tenant)) == {"sent": 2}
    # The same results through the broker later, or reported again, change nothing.
    again = await app.client.post("/internal/v1/results", json=report, headers=app.internal())
    assert again.json() == {"applied": [False, False]}
    unauthenticated = await app.client.post("/internal/v1/results", json=report)
    assert unauthenticated.status_code == 401
