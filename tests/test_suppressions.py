"""The suppression list: its API, the refusal at intake and the check again at dispatch, on
SQLite and PostgreSQL, with servers checked on a real SMTP server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlmodel import select

from services.scheduler.models import Email, SchedulerOutbox, Suppression
from shared.events import Event, EventType
from shared.settings import Settings
from shared.timeutil import utcnow
from tests.conftest import Api, running
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, dispatcher, published_jobs, warm_up


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings, combined=True) as api:
        yield api


async def test_add_list_get_delete_and_tenants_apart(app: Api) -> None:
    tenant = await app.new_tenant()
    other = await app.new_tenant("other")
    first = await app.client.post(
        "/v1/suppressions",
        json={"address": "Lead@Example.org", "reason": "asked by phone"},
        headers=tenant,
    )
    assert first.status_code == 201, first.text
    entry = first.json()
    assert (entry["address"], entry["domain"], entry["source"]) == (
        "lead@example.org",
        None,
        "manual",
    )
    again = await app.client.post(
        "/v1/suppressions", json={"address": "lead@example.org"}, headers=tenant
    )
    assert again.status_code == 200
    assert again.json()["id"] == entry["id"]
    domain = await app.client.post(
        "/v1/suppressions",
        json={"domain": "Bücher.DE", "source": "complaint", "reason": "whole company"},
        headers=tenant,
    )
    assert domain.status_code == 201, domain.text
    assert domain.json()["domain"] == "xn--bcher-kva.de"

    listed = (await app.client.get("/v1/suppressions", headers=tenant)).json()
    assert [item["id"] for item in listed["items"]] == [entry["id"], domain.json()["id"]]
    only = await app.client.get("/v1/suppressions", params={"source": "complaint"}, headers=tenant)
    assert [item["domain"] for item in only.json()["items"]] == ["xn--bcher-kva.de"]
    assert (await app.client.get("/v1/suppressions", headers=other)).json()["items"] == []
    hidden = await app.client.get(f"/v1/suppressions/{entry['id']}", headers=other)
    assert hidden.status_code == 404
    assert hidden.json()["code"] == "suppression_not_found"
    assert (
        await app.client.delete(f"/v1/suppressions/{entry['id']}", headers=other)
    ).status_code == 404

    deleted = await app.client.delete(f"/v1/suppressions/{entry['id']}", headers=tenant)
    assert deleted.status_code == 204
    assert (
        await app.client.get(f"/v1/suppressions/{entry['id']}", headers=tenant)
    ).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body"),
        ({"address": "a@example.org", "domain": "example.org"}, "body"),
        ({"address": "not-an-address"}, "body.address"),
        ({"domain": "no_dots"}, "body.domain"),
        ({"domain": "exa mple.org"}, "body.domain"),
        ({"address": "a@example.org", "source": "rumour"}, "body.source"),
        ({"address": "a@example.org", "reason": "line\nbreak"}, "body.reason"),
    ],
)
async def test_bad_entries_are_refused_with_the_field(
    app: Api, body: dict[str, str], field: str
) -> None:
    tenant = await app.new_tenant()
    response = await app.client.post("/v1/suppressions", json=body, headers=tenant)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert field in [error["field"] for error in response.json()["errors"]]


async def test_suppressed_recipients_are_refused_at_intake_and_never_sent(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await warm_up(app, servers)
    imported = await app.client.post(
        "/v1/suppressions/import",
        json={
            "items": [
                {"address": "gone@example.org", "source": "bounce"},
                {"domain": "blocked.example"},
                {"address": "gone@example.org"},
            ]
        },
        headers=tenant,
    )
    assert imported.status_code == 200, imported.text
    assert imported.json() == {"added": 2, "already_known": 1}
    batch = {
        "messages": [
            {"to": "ok@example.org", "subject": "Hi", "text": "x"},
            {"to": "GONE@example.org", "subject": "Hi", "text": "x"},
            {"to": "anyone@blocked.example", "subject": "Hi", "text": "x"},
        ]
    }
    accepted = await app.client.post("/v1/messages", json=batch, headers=tenant)
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert [item["status"] for item in body["items"]] == ["queued", "suppressed", "suppressed"]
    assert (body["queued"], body["suppressed"], body["duplicates"]) == (1, 2, 0)
    refused = await app.client.get(f"/v1/messages/{body['ids'][1]}", headers=tenant)
    assert refused.json()["status"] == "suppressed"
    await dispatcher(app).tick()
    assert [str(job.email_id) for job in published_jobs(app)] == [body["ids"][0]]

    # Another tenant's list does not apply.
    other = await app.new_tenant("other")
    theirs = await app.client.post(
        "/v1/messages",
        json={"to": "gone@example.org", "subject": "Hi", "text": "x"},
        headers=other,
    )
    assert theirs.json()["items"][0]["status"] == "queued"


async def test_an_address_suppressed_after_queueing_is_stopped_at_dispatch(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await warm_up(app, servers)
    batch = {
        "messages": [{"to": f"lead{i}@example.org", "subject": "Hi", "text": "x"} for i in range(4)]
    }
    ids = (await app.client.post("/v1/messages", json=batch, headers=tenant)).json()["ids"]
    # Written straight to the table, as a row committed by another replica between this
    # email's intake and its dispatch would be: only the dispatcher's own check can stop it.
    async with app.app.state.sessions() as session, session.begin():
        row = await session.get(Email, uuid.UUID(ids[0]))
        assert row is not None
        session.add(
            Suppression(tenant_id=row.tenant_id, address="lead0@example.org", created_at=utcnow())
        )
    # Through the API, queued emails to the address stop at once.
    stopped = await app.client.post(
        "/v1/suppressions", json={"address": "lead1@example.org"}, headers=tenant
    )
    assert stopped.status_code == 201
    assert (await app.client.get(f"/v1/messages/{ids[1]}", headers=tenant)).json()[
        "status"
    ] == "suppressed"

    await dispatcher(app).tick()
    sent = {str(job.email_id) for job in published_jobs(app)}
    assert sent == set(ids[2:])
    assert (await app.client.get(f"/v1/messages/{ids[0]}", headers=tenant)).json()[
        "status"
    ] == "suppressed"
    cancel = await app.client.post(f"/v1/messages/{ids[0]}/cancel", headers=tenant)
    assert cancel.status_code == 409
    # Both stops are announced (email.suppressed), each in the transaction that made it.
    async with app.app.state.sessions() as session:
        bodies = (await session.exec(select(SchedulerOutbox.body))).all()
    announced = [Event.decode(body) for body in bodies]
    assert sorted(
        e.data["email_id"] for e in announced if e.type is EventType.email_suppressed
    ) == sorted(ids[:2])
