"""Settling what no sender reported on, in one process (the same code runs in the stack, where
test_faults.py dead-letters jobs through RabbitMQ itself): a dead-lettered job returns its email
to `queued` with its reservation given back, or ends it `failed` once its attempts are spent; an
email `scheduled` for too long is swept the same way; an unparsable dead letter is parked."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from services.scheduler.settlement import Settler
from shared.broker import InProcessBus, dead_letter_queue, parked_queue
from shared.settings import Settings
from shared.timeutil import utcnow
from tests.conftest import Api, make_settings, running
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, dispatcher, emails, published_jobs


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


async def one_email(app: Api, tenant: dict[str, str], smtp: SmtpTestServer) -> tuple[str, str]:
    server_id, *others = await add_servers(app, tenant, smtp)
    for other in others:  # one server, so its reservation is easy to follow
        await app.client.post(f"/v1/servers/{other}/pause", headers=tenant)
    response = await app.client.post("/v1/messages", json=emails(1), headers=tenant)
    (email_id,) = response.json()["ids"]
    return server_id, email_id


async def email(app: Api, tenant: dict[str, str], email_id: str) -> dict[str, Any]:
    response = await app.client.get(f"/v1/messages/{email_id}", headers=tenant)
    body: dict[str, Any] = response.json()
    return body


async def reserved(app: Api, tenant: dict[str, str], server_id: str) -> int:
    url = f"/v1/servers/{server_id}/warmup"
    value: int = (await app.client.get(url, headers=tenant)).json()["reserved_today"]
    return value


def settings_with(database_url: str, **overrides: Any) -> Settings:
    return make_settings(database_url, retry_base_seconds=0.0, retry_cap_seconds=0.0, **overrides)


async def test_a_dead_lettered_job_returns_its_email_to_queued_until_its_attempts_are_spent(
    database_url: str, starttls_server: SmtpTestServer
) -> None:
    settings = settings_with(database_url, max_attempts=2)
    async with running(settings, combined=True) as app:
        tenant = await app.new_tenant()
        server_id, email_id = await one_email(app, tenant, starttls_server)
        bus: InProcessBus = app.app.state.bus
        dead = dead_letter_queue(settings.send_jobs_queue)
        for attempt in (1, 2):
            await dispatcher(app).tick()
            (job,) = published_jobs(app)
            assert await reserved(app, tenant, server_id) == 1
            await bus.publish(dead, job.model_dump_json().encode(), message_id=str(job.job_id))
            expected = "queued" if attempt == 1 else "failed"

            async def settled(status: str = expected) -> bool:
                current: str = (await email(app, tenant, email_id))["status"]
                return current == status

            await eventually(settled)
            assert await reserved(app, tenant, server_id) == 0  # given back
        final = await email(app, tenant, email_id)
        assert "dead-lettered" in (final["last_smtp_reply"] or "")
        # The same dead letter again changes nothing.
        await bus.publish(dead, job.model_dump_json().encode(), message_id="again")
        await asyncio.sleep(0.2)
        assert (await email(app, tenant, email_id))["status"] == "failed"


async def test_an_email_scheduled_too_long_is_swept_back_to_queued(
    database_url: str, starttls_server: SmtpTestServer
) -> None:
    settings = settings_with(database_url, sweep_after_seconds=3600)
    async with running(settings, combined=True) as app:
        tenant = await app.new_tenant()
        server_id, email_id = await one_email(app, tenant, starttls_server)
        await dispatcher(app).tick()
        assert len(published_jobs(app)) == 1  # taken from the queue: lost, as far as we know
        settler: Settler = app.app.state.settler
        assert await settler.sweep(utcnow() + timedelta(minutes=30)) == 0  # not yet
        assert await settler.sweep(utcnow() + timedelta(hours=2)) == 1
        swept = await email(app, tenant, email_id)
        assert (swept["status"], swept["attempts"]) == ("queued", 1)
        assert await reserved(app, tenant, server_id) == 0
        assert await settler.sweep(utcnow() + timedelta(hours=2)) == 0  # nothing twice


async def test_an_unparsable_dead_letter_is_parked_for_an_operator(database_url: str) -> None:
    settings = settings_with(database_url)
    async with running(settings, combined=True) as app:
        bus: InProcessBus = app.app.state.bus
        for queue in (settings.send_jobs_queue, settings.results_queue):
            await bus.publish(dead_letter_queue(queue), b"\x00 not json", message_id="junk")

        async def parked() -> bool:
            return all(
                [e.body for e in bus.parked.get(parked_queue(dead_letter_queue(q)), [])]
                == [b"\x00 not json"]
                for q in (settings.send_jobs_queue, settings.results_queue)
            )

        await eventually(parked)
