"""The scheduler's set-based statements, on SQLite and PostgreSQL: jobs written without pydantic
still are `SendJob`s, a cancel that slips between claim and mark wins, and a statement over many
rows is one statement whatever their number."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import date
from typing import Any

import orjson
import pytest
from sqlalchemy import Integer, column, table, text, update
from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import dispatcher as dispatcher_module
from services.scheduler import repository
from services.scheduler.models import Email
from shared.db import RowSet, create_engine, session_factory, table_of
from shared.messages import SendJob
from shared.settings import Settings
from shared.timeutil import new_id
from tests.conftest import Api, make_settings, running, truncate_postgres
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, dispatcher, published_jobs, warm_up


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings, combined=True) as api:
        yield api


async def test_a_published_job_is_the_send_job_pydantic_would_write(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    await warm_up(app, await add_servers(app, tenant, starttls_server))
    message = {
        "to": "lead@example.org",
        "subject": "Grüße, 日本 🎉",
        "text": "Hi\nthere",
        "html": "<p>Hi</p>",
        "reply_to": "replies@example.com",
        "headers": {"X-Campaign": "nov", "List-Unsubscribe": "<mailto:u@example.com>"},
    }
    (email_id,) = (await app.client.post("/v1/messages", json=message, headers=tenant)).json()[
        "ids"
    ]
    await dispatcher(app).tick()
    bus = app.app.state.bus
    body = bus.queues[app.settings.send_jobs_queue].get_nowait().body
    job = SendJob.model_validate_json(body)
    assert orjson.loads(body) == orjson.loads(job.model_dump_json())  # no field lost or added
    email = (await app.client.get(f"/v1/messages/{email_id}", headers=tenant)).json()
    assert str(job.email_id) == email_id
    assert str(job.server_id) == email["server_id"]
    assert job.attempt == email["attempts"] + 1
    assert job.content.model_dump(exclude={"message_id", "date"}) == {
        **{
            key: message.get(key)
            for key in ("to", "subject", "text", "html", "reply_to", "headers")
        },
        # No one-click unsubscribe was asked for (tests/test_unsubscribe.py covers it).
        "unsubscribe_url": None,
        "unsubscribe_token": None,
    }
    assert job.content.message_id == email["message_id"]
    # The email's Date: when it was accepted, the same on every attempt.
    assert job.content.date is not None
    assert job.content.date.isoformat().replace("+00:00", "Z") == email["created_at"].replace(
        "+00:00", "Z"
    )


async def test_an_email_canceled_between_claim_and_mark_stays_canceled_and_reserves_nothing(
    app: Api, starttls_server: SmtpTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = await app.new_tenant()
    (server_id, *others) = await add_servers(app, tenant, starttls_server)
    for other in others:  # one server, so the reservation is easy to follow
        await app.client.post(f"/v1/servers/{other}/pause", headers=tenant)
    ids = (
        await app.client.post(
            "/v1/messages",
            json={
                "messages": [
                    {"to": f"l{i}@example.org", "subject": "s", "text": "t"} for i in range(3)
                ]
            },
            headers=tenant,
        )
    ).json()["ids"]
    claim = repository.claim_due

    async def claim_then_cancel_one(session: AsyncSession, *args: Any) -> Sequence[Any]:
        rows = await claim(session, *args)
        # As a cancel committed right after the claim would leave the row.
        emails = table_of(Email)
        await session.exec(
            update(emails).where(emails.c.id == rows[0].id).values(status="canceled")
        )
        return rows

    monkeypatch.setattr(repository, "claim_due", claim_then_cancel_one)
    report = await dispatcher(app).tick()
    assert report.dispatched == 2
    assert sorted(str(job.email_id) for job in published_jobs(app)) == sorted(ids[1:])
    first = (await app.client.get(f"/v1/messages/{ids[0]}", headers=tenant)).json()
    assert first["status"] == "canceled"
    warmup = (await app.client.get(f"/v1/servers/{server_id}/warmup", headers=tenant)).json()
    assert (warmup["reserved_today"], warmup["rolling_24h_used"]) == (2, 2)


async def test_one_statement_updates_more_rows_than_a_statement_may_have_parameters(
    settings: Settings,
) -> None:
    # asyncpg takes at most 32,767 parameters; a VALUES list of 40,000 pairs would need 80,000.
    engine = create_engine(settings.database_url)
    rows = [(n, n * 2) for n in range(40_000)]
    things = table("things", column("id", Integer), column("value", Integer))
    try:
        async with session_factory(engine)() as session, session.begin():
            await session.exec(text("DROP TABLE IF EXISTS things"))  # type: ignore[call-overload]
            await session.exec(
                text("CREATE TABLE things (id INTEGER PRIMARY KEY, value INTEGER)")  # type: ignore[call-overload]
            )
            await session.exec(  # type: ignore[call-overload]
                text("INSERT INTO things (id, value) VALUES (:id, 0)"),
                params=[{"id": n} for n, _ in rows],
            )
            values = RowSet(session, {"id": Integer(), "value": Integer()}, rows)
            await values.execute(
                session,
                update(things).where(things.c.id == values.c["id"]).values(value=values.c["value"]),
            )
            total = (await session.exec(text("SELECT sum(value) FROM things"))).scalar_one()  # type: ignore[call-overload]
            assert total == sum(value for _, value in rows)
            await session.exec(text("DROP TABLE things"))  # type: ignore[call-overload]
    finally:
        await engine.dispose()


async def test_counters_of_many_servers_are_written_together_and_never_below_zero(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await warm_up(app, servers)
    await app.client.post(
        "/v1/messages",
        json={
            "messages": [{"to": f"l{i}@example.org", "subject": "s", "text": "t"} for i in range(6)]
        },
        headers=tenant,
    )
    report = await dispatcher(app).tick()
    assert sorted(report.by_server.values()) == [2, 2, 2]
    jobs = published_jobs(app)
    day = date.fromisoformat(jobs[0].reserved_day)
    async with app.app.state.sessions() as session, session.begin():
        await repository.write_counters(
            session,
            # Three given back where two were reserved: the counter stops at 0.
            days={(server_id, day): (3, 1) for server_id in report.by_server},
            hours={},
        )
    for server_id in servers:
        warmup = (await app.client.get(f"/v1/servers/{server_id}/warmup", headers=tenant)).json()
        assert (warmup["reserved_today"], warmup["sent_today"]) == (0, 1)


async def test_an_idempotency_key_stored_meanwhile_refuses_the_whole_batch(app: Api) -> None:
    tenant = await app.new_tenant()
    message = {"to": "lead@example.org", "subject": "s", "text": "t", "idempotency_key": "k-1"}
    (email_id,) = (await app.client.post("/v1/messages", json=message, headers=tenant)).json()[
        "ids"
    ]
    async with app.app.state.sessions() as session, session.begin():
        stored = await session.get(Email, uuid.UUID(email_id))
        assert stored is not None
        row = {column.name: getattr(stored, column.name) for column in table_of(Email).columns}
        # A second request that looked for the key before the first one committed.
        other = {**row, "id": new_id(), "idempotency_key": "k-2"}
        racing = {**row, "id": new_id()}
        assert await repository.add_emails(session, [other, racing]) is False
    async with app.app.state.sessions() as session:
        assert await session.get(Email, other["id"]) is None  # nothing of that batch stored


@pytest.mark.postgres
async def test_tables_filled_by_a_tick_get_fresh_planner_statistics(
    migrated_postgres: str, starttls_server: SmtpTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await truncate_postgres(migrated_postgres)
    monkeypatch.setattr(dispatcher_module, "ANALYZE_AFTER_ROWS", 1)
    async with running(make_settings(migrated_postgres), combined=True) as api:
        tenant = await api.new_tenant()
        await add_servers(api, tenant, starttls_server)  # three fresh servers: no rows yet
        message = {"to": "lead@example.org", "subject": "s", "text": "t"}
        await api.client.post("/v1/messages", json=message, headers=tenant)
        await dispatcher(api).tick()
        async with api.app.state.sessions() as session:
            estimates = await session.exec(
                text(
                    "SELECT relname, reltuples FROM pg_class "
                    "WHERE relname IN ('server_warmup', 'server_days')"
                )
            )
            # What ANALYZE wrote: the planner no longer takes them for empty tables.
            assert dict(estimates.all()) == {"server_warmup": 3, "server_days": 3}


async def test_a_transaction_claims_up_to_its_bound_and_the_next_tick_takes_the_rest(
    app: Api, starttls_server: SmtpTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Several tenants share one dispatch transaction; its claim is bounded in all, and the
    # tenants it did not reach are not lost but dispatched by the next tick.
    monkeypatch.setattr(dispatcher_module, "MAX_CLAIM_PER_TRANSACTION", 4)
    ids: list[str] = []
    for _ in range(2):
        tenant = await app.new_tenant()
        await warm_up(app, await add_servers(app, tenant, starttls_server))
        messages = [{"to": f"l{i}@example.org", "subject": "s", "text": "t"} for i in range(3)]
        response = await app.client.post(
            "/v1/messages", json={"messages": messages}, headers=tenant
        )
        ids += response.json()["ids"]
    first = await dispatcher(app).tick()
    assert first.dispatched == 4
    second = await dispatcher(app).tick()
    assert second.dispatched == 2
    assert sorted(str(job.email_id) for job in published_jobs(app)) == sorted(ids)
