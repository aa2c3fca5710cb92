"""Several dispatchers at once on PostgreSQL: the allowance is a hard limit and no email is
dispatched twice. Each dispatcher has its own engine, as separate replicas would."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import date

import pytest
from sqlmodel import select

from services.scheduler import repository
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.models import ServerDay
from shared.broker import InProcessBus
from shared.db import create_engine, session_factory
from shared.messages import SendJob
from shared.settings import Settings
from shared.timeutil import utcnow
from tests.conftest import make_settings, running, truncate_postgres
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, emails, warm_up

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_settings(migrated_postgres: str) -> Settings:
    asyncio.run(truncate_postgres(migrated_postgres))
    return make_settings(migrated_postgres)


async def run_replicas(settings: Settings, replicas: int, ticks: int) -> list[SendJob]:
    buses = [InProcessBus() for _ in range(replicas)]
    engines = [create_engine(settings.database_url) for _ in range(replicas)]
    dispatchers = [
        Dispatcher(settings, session_factory(engine), bus)
        for engine, bus in zip(engines, buses, strict=True)
    ]
    try:
        for _ in range(ticks):
            await asyncio.gather(*(d.tick() for d in dispatchers))
    finally:
        for engine in engines:
            await engine.dispose()
    jobs = []
    for bus in buses:
        queue = bus.queues.get(settings.send_jobs_queue)
        while queue is not None and not queue.empty():
            jobs.append(SendJob.model_validate_json(queue.get_nowait().body))
    return jobs


async def test_concurrent_dispatchers_never_pass_the_allowance(
    pg_settings: Settings, starttls_server: SmtpTestServer
) -> None:
    async with running(pg_settings, combined=True) as api:
        tenant = await api.new_tenant()
        servers = await add_servers(api, tenant, starttls_server)
        await warm_up(api, servers[:1], step=3)  # 34 a day
        for _ in range(3):
            await api.client.post("/v1/messages", json=emails(100), headers=tenant)
        jobs = await run_replicas(pg_settings, replicas=8, ticks=3)
        per_server = Counter(str(job.server_id) for job in jobs)
        assert per_server == {servers[0]: 34, servers[1]: 20, servers[2]: 20}
        assert len(jobs) == len({job.email_id for job in jobs}), "an email was dispatched twice"
        async with api.app.state.sessions() as session:
            for server_id in servers:
                query = select(ServerDay).where(ServerDay.server_id == uuid.UUID(server_id))
                days = (await session.exec(query)).all()
                assert [day.reserved for day in days] == [per_server[server_id]]


async def test_concurrent_reservations_sum_to_the_allowance(
    pg_settings: Settings, starttls_server: SmtpTestServer
) -> None:
    async with running(pg_settings, combined=True) as api:
        tenant = await api.new_tenant()
        (server_id, *_) = await add_servers(api, tenant, starttls_server)
    engines = [create_engine(pg_settings.database_url) for _ in range(10)]
    server = uuid.UUID(server_id)
    today = date.today()
    async with session_factory(engines[0])() as session, session.begin():
        session.add(ServerDay(server_id=server, day=today, tenant_id=uuid.uuid4(), allowance=50))

    async def grab(engine_index: int) -> int:
        total = 0
        factory = session_factory(engines[engine_index])
        for _ in range(10):
            async with factory() as session, session.begin():
                total += await repository.reserve(session, server, today, 3, utcnow())
        return total

    granted = await asyncio.gather(*(grab(i) for i in range(10)))
    for engine in engines:
        await engine.dispose()
    assert sum(granted) == 50
