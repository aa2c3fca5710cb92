"""The scheduler's and the webhooks service's own copies of the registry's tenants and servers:
changes by version (replays, duplicates and reordering change nothing, a tombstone stays), the
registry writing a change for every path that changes a copied column, a pause stopping dispatch
within one tick, a lost publish published again, an empty copy rebuilt from the snapshot routes,
and a key or server asked of the registry before its change has arrived.

On SQLite and PostgreSQL, with the one-process app and real SMTP servers behind the checks."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import changes
from services.registry import credentials as registry_use_cases
from services.registry.domain import ServerStatus
from services.registry.models import RegistryChangesOutbox
from services.scheduler.models import SchedulerCopyState, SchedulerServer, SchedulerTenant
from services.scheduler.registry_copy import RegistryCopy, tenant_servers
from services.webhooks.models import WebhooksTenant
from shared.broker import BrokerUnavailable, Delivery
from shared.copies import apply_newer
from shared.db import create_engine, session_factory, table_of
from shared.messages import Outcome
from shared.outbox import Outbox
from shared.registry_changes import (
    CopyUnavailable,
    RegistryChange,
    ServerCopy,
    ServerCopyPage,
    TenantCopy,
    TenantCopyPage,
)
from shared.settings import Settings
from shared.tenancy import hash_api_key
from shared.timeutil import utcnow
from tests.conftest import Api, running
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import (
    add_servers,
    dispatcher,
    emails,
    published_jobs,
    result_for,
    warm_up,
)

SERVERS = table_of(SchedulerServer)
TENANTS = table_of(SchedulerTenant)
OUTBOX = table_of(RegistryChangesOutbox)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings, combined=True) as api:
        yield api


def copy_of(api: Api) -> RegistryCopy:
    kept: RegistryCopy = api.app.state.copies["scheduler"]
    return kept


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return await check()


async def copied_servers(api: Api) -> dict[uuid.UUID, tuple[Any, ...]]:
    async with api.app.state.sessions() as session:
        rows = (await session.exec(select(SERVERS))).all()
    return {
        row.id: (row.tenant_id, row.status, row.daily_cap, row.provider, row.version, row.deleted)
        for row in rows
    }


async def copied_tenants(api: Api) -> dict[uuid.UUID, tuple[Any, ...]]:
    async with api.app.state.sessions() as session:
        rows = (await session.exec(select(TENANTS))).all()
    return {row.id: (row.name, row.api_key_hash, row.version, row.deleted) for row in rows}


async def registry_servers(api: Api) -> dict[uuid.UUID, tuple[Any, ...]]:
    async with api.app.state.sessions() as session:
        page = await changes.server_copies(session, after=None, limit=1000)
    return {
        s.id: (s.tenant_id, s.status, s.daily_cap, s.provider, s.version, False) for s in page.items
    }


async def change_bodies(api: Api) -> list[bytes]:
    async with api.app.state.sessions() as session:
        rows = (await session.exec(select(OUTBOX.c.body).order_by(OUTBOX.c.id))).all()
    return [row[0] for row in rows]


def server_record(server_id: uuid.UUID, version: int, **extra: Any) -> ServerCopy:
    values: dict[str, Any] = {
        "id": server_id,
        "tenant_id": uuid.UUID(int=1),
        "status": f"status-{version}",
        "daily_cap": 100 + version,
        "label": "",
        "host": "smtp.example.com",
        "username": "ada@example.com",
        "provider": None,
        "reads_mailbox": False,
        "version": version,
    }
    return ServerCopy(**(values | extra))


# -- applying records by version ----------------------------------------------------------------


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    factory = session_factory(engine)
    async with factory() as session, session.begin():
        await session.exec(delete(SERVERS))
    try:
        yield factory
    finally:
        await engine.dispose()


async def stored(
    sessions: async_sessionmaker[AsyncSession], server_id: uuid.UUID
) -> tuple[str, int, int, bool] | None:
    async with sessions() as session:
        query = select(SERVERS.c.status, SERVERS.c.daily_cap, SERVERS.c.version, SERVERS.c.deleted)
        row = (await session.exec(query.where(SERVERS.c.id == server_id))).first()  # type: ignore[call-overload]
    return None if row is None else (row[0], row[1], row[2], row[3])


@pytest.mark.parametrize(
    ("arrivals", "expected"),
    [
        ([1, 2, 3], 3),
        ([3, 2, 1], 3),
        ([2, 2, 2], 2),
        ([1, 3, 1, 3, 2], 3),
    ],
)
async def test_the_newest_version_wins_whatever_the_order(
    sessions: async_sessionmaker[AsyncSession], arrivals: list[int], expected: int
) -> None:
    server_id = uuid.uuid4()
    for version in arrivals:
        async with sessions() as session, session.begin():
            await apply_newer(session, SERVERS, [server_record(server_id, version)])
    assert await stored(sessions, server_id) == (
        f"status-{expected}",
        100 + expected,
        expected,
        False,
    )


async def test_a_tombstone_is_not_revived_by_an_older_record(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    server_id = uuid.uuid4()
    for record in [
        server_record(server_id, 3),
        server_record(server_id, 4, deleted=True),
        server_record(server_id, 3),
        server_record(server_id, 2),
    ]:
        async with sessions() as session, session.begin():
            await apply_newer(session, SERVERS, [record])
    found = await stored(sessions, server_id)
    assert found is not None
    assert found[2:] == (4, True)


async def test_one_batch_with_duplicates_keeps_each_rows_newest(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    batch = [server_record(first, 2), server_record(second, 1), server_record(first, 5)]
    async with sessions() as session, session.begin():
        assert await apply_newer(session, SERVERS, batch) == 2, "two rows changed"
    async with sessions() as session, session.begin():
        assert await apply_newer(session, SERVERS, batch) == 0, "a replay changes none"
    assert await stored(sessions, first) == ("status-5", 105, 5, False)
    assert await stored(sessions, second) == ("status-1", 101, 1, False)


@hypothesis_settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    versions=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 20), st.booleans()), min_size=1, max_size=25
    ),
    seed=st.integers(0, 10_000),
)
def test_any_order_of_any_replays_ends_at_each_rows_newest_record(
    sqlite_url: str, versions: list[tuple[int, int, bool]], seed: int
) -> None:
    """Whatever arrives, in whatever order and however often, the copy ends holding for each row
    the record with the highest version (its content is a function of id and version, as the
    registry's are)."""
    ids = [uuid.UUID(int=n + 1) for n in range(4)]
    records = [
        server_record(ids[row], version, deleted=(version % 5 == 4) and gone)
        for row, version, gone in versions
    ]
    # Same id and version, same content: a tombstone decision is fixed per (row, version).
    canonical: dict[tuple[uuid.UUID, int], ServerCopy] = {}
    for record in records:
        canonical.setdefault((record.id, record.version), record)
    records = [canonical[(r.id, r.version)] for r in records]
    arrivals = records * 2
    random.Random(seed).shuffle(arrivals)

    async def run() -> dict[uuid.UUID, tuple[str, int, int, bool] | None]:
        engine = create_engine(sqlite_url)
        factory = session_factory(engine)
        try:
            async with factory() as session, session.begin():
                await session.exec(delete(SERVERS))
            for record in arrivals:
                async with factory() as session, session.begin():
                    await apply_newer(session, SERVERS, [record])
            return {server_id: await stored(factory, server_id) for server_id in ids}
        finally:
            await engine.dispose()

    result = asyncio.run(run())
    for server_id in ids:
        mine = [r for r in records if r.id == server_id]
        if not mine:
            assert result[server_id] is None
            continue
        newest = max(mine, key=lambda r: r.version)
        assert result[server_id] == (
            newest.status,
            newest.daily_cap,
            newest.version,
            newest.deleted,
        )


# -- the registry's changes reach the copies -----------------------------------------------------


async def test_every_change_of_a_server_reaches_the_copy_with_a_higher_version(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    (server_id,) = await add_servers(
        app, tenant, starttls_server, {"alice@example.com": "alice-app-password"}
    )
    sid = uuid.UUID(server_id)
    url = f"/v1/servers/{server_id}"

    async def copied(status: str) -> bool:
        return await _status(app, sid, status)

    assert await eventually(lambda: copied("active"), 2)
    first_version = (await copied_servers(app))[sid][4]
    assert (await app.client.post(f"{url}/pause", headers=tenant)).status_code == 200
    assert await eventually(lambda: copied("paused"), 2)
    assert (await app.client.post(f"{url}/resume", headers=tenant)).status_code == 200
    assert await eventually(lambda: copied("active"), 2)
    patched = await app.client.patch(url, json={"daily_cap": 120}, headers=tenant)
    assert patched.status_code == 200, patched.text
    assert await eventually(lambda: _cap(app, sid, 120), 2)
    # A status changed by a conditional Core UPDATE (a sender's report), not the ORM.
    async with app.app.state.sessions() as session, session.begin():
        await registry_use_cases.record_health(
            session, sid, ServerStatus.auth_failed, "535 5.7.8 refused"
        )
    assert await eventually(lambda: copied("auth_failed"), 2)
    assert (await copied_servers(app))[sid][4] > first_version
    assert (await copied_servers(app)) == await registry_servers(app)
    # Deleted: a tombstone in the copy, gone from what the scheduler reads.
    assert (await app.client.delete(url, headers=tenant)).status_code == 204
    assert await eventually(lambda: _deleted(app, sid), 2)
    async with app.app.state.sessions() as session:
        tenant_id = (await copied_servers(app))[sid][0]
        assert await tenant_servers(session, tenant_id) == []


async def _cap(app: Api, server_id: uuid.UUID, cap: int) -> bool:
    row = (await copied_servers(app)).get(server_id)
    return row is not None and row[2] == cap


async def _deleted(app: Api, server_id: uuid.UUID) -> bool:
    row = (await copied_servers(app)).get(server_id)
    return row is not None and row[5] is True


async def test_a_server_paused_in_the_registry_stops_dispatch_within_one_tick(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await warm_up(app, servers)
    paused = await app.client.post(f"/v1/servers/{servers[0]}/pause", headers=tenant)
    assert paused.json()["status"] == "paused"
    # The change travels by the outbox and the bus: in the copy before the next tick is due.
    tick = app.settings.tick_seconds
    assert await eventually(lambda: _status(app, uuid.UUID(servers[0]), "paused"), tick), (
        f"the pause did not reach the scheduler's copy within one tick ({tick} s)"
    )
    accepted = await app.client.post("/v1/messages", json=emails(30), headers=tenant)
    assert accepted.status_code == 202
    await dispatcher(app).tick()
    jobs = published_jobs(app)
    assert Counter(str(job.server_id) for job in jobs) == {servers[1]: 15, servers[2]: 15}


async def _status(app: Api, server_id: uuid.UUID, status: str) -> bool:
    row = (await copied_servers(app)).get(server_id)
    return row is not None and row[1] == status


async def test_replaying_every_change_twice_in_any_order_changes_nothing(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    await app.new_tenant("other")
    servers = await add_servers(app, tenant, starttls_server)
    await app.client.post(f"/v1/servers/{servers[0]}/pause", headers=tenant)
    await app.client.patch(f"/v1/servers/{servers[1]}", json={"daily_cap": 77}, headers=tenant)
    await app.client.delete(f"/v1/servers/{servers[2]}", headers=tenant)

    async def settled() -> bool:
        copied = await copied_servers(app)
        live = await registry_servers(app)
        return all(copied.get(k) == v for k, v in live.items()) and _deleted_in(
            copied, uuid.UUID(servers[2])
        )

    assert await eventually(settled, 3)
    servers_before, tenants_before = await copied_servers(app), await copied_tenants(app)
    bodies = await change_bodies(app)
    assert len(bodies) >= 2 + 3 + 3, "two tenants, three servers, three changes"
    replay = bodies * 2
    random.Random(7).shuffle(replay)
    kept = copy_of(app)
    for body in replay:
        await kept.handle(Delivery(body, RegistryChange.decode(body).id, 2))
    assert await copied_servers(app) == servers_before
    assert await copied_tenants(app) == tenants_before


def _deleted_in(copied: dict[uuid.UUID, tuple[Any, ...]], server_id: uuid.UUID) -> bool:
    row = copied.get(server_id)
    return row is not None and row[5] is True


async def test_a_change_whose_publish_was_lost_is_published_again(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    """The broker refuses the relay's first publish: the row stays pending, and the relay's
    next pass sends it."""
    tenant = await app.new_tenant()
    (server_id,) = await add_servers(
        app, tenant, starttls_server, {"bob@example.com": "bob-app-password"}
    )
    sid = uuid.UUID(server_id)
    assert await eventually(lambda: _status(app, sid, "active"), 2)
    relay: Outbox = app.app.state.registry_changes
    flaky = RefusesFirst(relay.bus)
    relay.bus = flaky
    async with app.app.state.sessions() as session, session.begin():
        await registry_use_cases.pause_for_bounces(session, sid, "bounce rate 9 %")
    assert await eventually(lambda: _status(app, sid, "paused_bounces"), 4)
    assert flaky.refused == 1, "the first publish was refused"
    async with app.app.state.sessions() as session:
        query = select(OUTBOX.c.id).where(OUTBOX.c.published_at.is_(None))
        assert (await session.exec(query)).all() == []


class RefusesFirst:
    """A bus that refuses its first publish, then passes everything to the real one."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bus, name)

    async def publish(self, queue: str, body: bytes, **kwargs: Any) -> None:
        if not self.refused:
            self.refused += 1
            raise BrokerUnavailable("the broker went away")
        await self.bus.publish(queue, body, **kwargs)


async def test_an_empty_copy_is_rebuilt_from_the_registry_and_is_not_ready_until_then(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    await app.new_tenant("second")
    await add_servers(app, tenant, starttls_server)
    assert await eventually(lambda: _same(app), 3), (
        "the copy follows the registry before it is lost"
    )
    expected_servers, expected_tenants = await copied_servers(app), await copied_tenants(app)
    async with app.app.state.sessions() as session, session.begin():
        await session.exec(delete(SERVERS))
        await session.exec(delete(TENANTS))
    kept = copy_of(app)
    fresh = RegistryCopy(app.app.state.sessions, kept.source, resync_seconds=3600)
    stop = asyncio.Event()
    runner = asyncio.create_task(fresh.run(stop))
    try:
        await asyncio.wait_for(fresh.ready.wait(), 5)
    finally:
        stop.set()
        await runner
    assert await copied_servers(app) == expected_servers
    assert await copied_tenants(app) == expected_tenants


async def _same(app: Api, tenants: int = 2) -> bool:
    servers = await copied_servers(app) == await registry_servers(app)
    return servers and len(await copied_tenants(app)) == tenants


async def test_the_webhooks_copy_knows_every_tenant(app: Api) -> None:
    await app.new_tenant("one")
    await app.new_tenant("two")
    webhooks = table_of(WebhooksTenant)

    async def both() -> bool:
        async with app.app.state.sessions() as session:
            rows = (await session.exec(select(webhooks.c.name))).all()
        return sorted(row[0] for row in rows) == ["one", "two"]

    assert await eventually(both, 2)


# -- asked before the change arrives ------------------------------------------------------------


class CountingSource:
    """A registry that knows one tenant and counts how often it is asked."""

    def __init__(self, tenant: TenantCopy) -> None:
        self.tenant = tenant
        self.asked: Counter[str] = Counter()

    async def tenants(
        self, *, cursor: str | None, limit: int, key_digest: str | None = None
    ) -> TenantCopyPage:
        self.asked[key_digest or "all"] += 1
        found = [self.tenant] if key_digest in (None, self.tenant.api_key_hash) else []
        return TenantCopyPage(items=[] if cursor else found)

    async def servers(
        self, *, cursor: str | None, limit: int, tenant_id: uuid.UUID | None = None
    ) -> ServerCopyPage:
        self.asked["servers"] += 1
        return ServerCopyPage(items=[])


async def test_a_key_made_a_moment_ago_is_asked_of_the_registry_and_a_wrong_one_rarely(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session, session.begin():
        await session.exec(delete(TENANTS))
    digest = hash_api_key("abl_known")
    source = CountingSource(
        TenantCopy(id=uuid.uuid4(), name="acme", api_key_hash=digest, version=1)
    )
    kept = RegistryCopy(sessions, source)
    found = await kept.authenticate(digest)
    assert found is not None
    assert found.name == "acme"
    assert await kept.authenticate(digest) == found
    assert source.asked[digest] == 1, "once copied, the key is answered from the copy"
    wrong = hash_api_key("abl_guessed")
    for _ in range(20):
        assert await kept.authenticate(wrong) is None
    assert source.asked[wrong] == 1, "a key the registry does not know is not asked again at once"
    made_up = [hash_api_key(f"abl_flood{i}") for i in range(200)]
    for key in made_up:
        assert await kept.authenticate(key) is None
    assert sum(source.asked[key] for key in made_up) < 60, "a flood of keys is not passed on"


async def test_a_server_added_a_moment_ago_is_read_before_the_batch_is_answered(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    """The change of a new server may still be on its way: the intake asks the registry for
    the tenant's servers when the copy shows none that may send."""
    tenant = await app.new_tenant()
    await add_servers(app, tenant, starttls_server)
    assert await eventually(lambda: _same(app, tenants=1), 3)
    # As if the three changes were still on their way.
    async with app.app.state.sessions() as session, session.begin():
        await session.exec(delete(SERVERS))
    accepted = await app.client.post("/v1/messages", json=emails(3), headers=tenant)
    assert accepted.status_code == 202
    assert accepted.json()["active_servers"] == 3
    assert accepted.json()["warning"] is None


class RefusesAll:
    """A bus that refuses every publish: the registry's changes do not reach the copies."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bus, name)

    async def publish(self, queue: str, body: bytes, **kwargs: Any) -> None:
        raise BrokerUnavailable("the broker went away")


async def test_a_job_sent_to_a_server_the_registry_stopped_costs_no_attempt_and_goes_elsewhere(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    """The registry paused a server but its change has not reached the scheduler (the relay
    cannot publish): a job is dispatched there, the sender finds the server not active. That
    result counts no attempt of the email, the scheduler reads the server again from the
    registry at once, and the next tick sends the email through another server."""
    tenant = await app.new_tenant()
    servers = await add_servers(app, tenant, starttls_server)
    await warm_up(app, servers)
    relay: Outbox = app.app.state.registry_changes
    relay.bus = RefusesAll(relay.bus)
    paused = await app.client.post(f"/v1/servers/{servers[0]}/pause", headers=tenant)
    assert paused.json()["status"] == "paused"
    stopped = uuid.UUID(servers[0])
    assert await _status(app, stopped, "active"), "the copy has not heard of the pause"
    await app.client.post("/v1/messages", json=emails(3), headers=tenant)
    await dispatcher(app).tick()
    jobs = published_jobs(app)
    (job,) = [j for j in jobs if j.server_id == stopped]
    result = result_for(job, Outcome.retry, data_completed=False, problem="inactive", code=None)
    assert await app.app.state.result_applier.apply_many([result]) == [True]
    assert await _status(app, stopped, "paused"), "read again from the registry"
    email = (await app.client.get(f"/v1/messages/{job.email_id}", headers=tenant)).json()
    assert (email["status"], email["attempts"]) == ("queued", 0)
    await dispatcher(app).tick()
    (again,) = published_jobs(app)
    assert again.email_id == job.email_id
    assert again.server_id != stopped


class AwayRegistry:
    """A registry that cannot be reached."""

    async def tenants(
        self, *, cursor: str | None, limit: int, key_digest: str | None = None
    ) -> TenantCopyPage:
        raise CopyUnavailable("registry unreachable: ConnectError")

    async def servers(
        self, *, cursor: str | None, limit: int, tenant_id: uuid.UUID | None = None
    ) -> ServerCopyPage:
        raise CopyUnavailable("registry unreachable: ConnectError")


async def test_a_copy_is_ready_only_once_it_held_a_whole_snapshot(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Rows alone do not make a copy ready (a rebuild cut halfway, a backlog of changes taken
    before any snapshot): with the registry away, a copy that never read a whole snapshot stays
    not ready; one that did is ready on the last one, and takes changes meanwhile."""
    state = table_of(SchedulerCopyState)
    async with sessions() as session, session.begin():
        await session.exec(delete(TENANTS))
        await session.exec(delete(state))
    kept = RegistryCopy(sessions, AwayRegistry(), resync_seconds=3600)
    async with sessions() as session, session.begin():
        await apply_newer(session, SERVERS, [server_record(uuid.uuid4(), 1)])  # a backlog row

    async def run_a_moment() -> None:
        stop = asyncio.Event()
        runner = asyncio.create_task(kept.run(stop))
        await asyncio.sleep(0.5)
        stop.set()
        await runner

    await run_a_moment()
    assert not kept.ready.is_set(), "rows but never a whole snapshot: not ready"
    async with sessions() as session, session.begin():
        await session.exec(state.insert().values(id=1, snapshot_at=utcnow()))
    await run_a_moment()
    assert kept.ready.is_set(), "a whole snapshot read before: ready while the registry is away"


async def test_a_row_a_resync_wrongly_tombstoned_comes_back_at_the_same_version(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """A resync marks rows it did not see as gone, keeping their version (replicas' clocks may
    disagree about what was copied before it began): the registry listing the row again at that
    version brings it back, while a real delete's tombstone (version + 1) stays."""
    live, deleted = uuid.uuid4(), uuid.uuid4()
    async with sessions() as session, session.begin():
        await apply_newer(session, SERVERS, [server_record(live, 3), server_record(deleted, 3)])
        await session.exec(
            update(SERVERS).where(SERVERS.c.id == live).values(deleted=True)
        )  # as `resync` marks a row it did not see
        await apply_newer(session, SERVERS, [server_record(deleted, 4, deleted=True)])
    async with sessions() as session, session.begin():
        changed = await apply_newer(
            session, SERVERS, [server_record(live, 3), server_record(deleted, 3)]
        )
    assert changed == 1
    assert await stored(sessions, live) == ("status-3", 103, 3, False)
    assert await stored(sessions, deleted) == ("status-4", 104, 4, True)
