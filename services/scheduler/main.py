"""The scheduler service: create_app, and the dispatch loop and result consumer it runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import TypeAdapter

from services.scheduler import inbox, repository, service, stats
from services.scheduler.api import router
from services.scheduler.dispatcher import Dispatcher, retry_policy_from
from services.scheduler.mailbox_source import HttpMailboxSource
from services.scheduler.models import MessageBatch, SchedulerOutbox
from services.scheduler.registry_copy import RegistryCopy
from services.scheduler.results import ResultApplier
from services.scheduler.settlement import Settler, patient_handler
from shared.app import (
    Loop,
    Resource,
    add_readiness_check,
    background_loops,
    build_app,
    database,
)
from shared.bus_resource import rabbit_bus
from shared.copies import SourceFactory, copy_resource, registry_source_over_http
from shared.events import EVENTS_PER_MESSAGE
from shared.outbox import Outbox
from shared.settings import SchedulerSettings
from shared.spec import REF_TEMPLATE, add_component

RESULT_PREFETCH = 64


def scheduler_resources(
    settings: SchedulerSettings, *, run_loop: bool = True, recover_in_memory: bool = False
) -> Resource:
    """Needs `app.state.sessions` and `app.state.bus` from resources opened before it.

    `recover_in_memory`: the in-process bus lost its jobs with the last process, so every
    `scheduled` email is published again at start (the sender skips any already sent).
    """

    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        bus = app.state.bus
        dispatcher = Dispatcher(settings, app.state.sessions, bus)
        copy = _copy_of(app)
        applier = ResultApplier(
            app.state.sessions,
            retry_policy_from(settings),
            server_news=copy.refresh_server if copy else None,
        )
        app.state.dispatcher = dispatcher
        app.state.result_applier = applier
        # Email and server events for the webhooks service, written with the change they
        # describe (`services.scheduler.events`).
        relay = Outbox(
            SchedulerOutbox,
            app.state.sessions,
            bus,
            settings.events_queue,
            per_message=EVENTS_PER_MESSAGE,
            service="scheduler",
            poll_seconds=settings.outbox_poll_seconds,
            keep_seconds=settings.outbox_keep_seconds,
        )
        app.state.scheduler_outbox = relay
        if recover_in_memory:
            async with app.state.sessions() as session, session.begin():
                await repository.expire_all_leases(session)
            await relay.republish_recent()
        settler = Settler(settings, app.state.sessions, bus, applier)
        app.state.settler = settler
        # Up to this many results wait together; the applier writes them in one transaction.
        # With the broker away, consuming starts as soon as it answers.
        await bus.consume(
            settings.results_queue,
            patient_handler(applier.handle, settings.dependency_wait_seconds, "result"),
            prefetch=RESULT_PREFETCH,
        )
        await settler.start()

        async def consumers_registered() -> bool:
            return bus.consuming(settings.results_queue) and settler.consuming()

        add_readiness_check(app, consumers_registered)
        loops: list[Loop] = (
            [
                dispatcher.run,
                partial(stats.run, app.state.sessions, bus, settings),
                settler.run_sweeps,
                relay.run,
            ]
            if run_loop
            else []
        )
        try:
            async with background_loops(*loops):
                yield
        finally:
            # Result events still in this process are applied before it goes.
            await bus.settle(settings.sender_drain_seconds)
            await applier.close()

    return resource


def scheduler_copy(
    settings: SchedulerSettings, source: SourceFactory, *, run_loop: bool = True
) -> Resource:
    """The scheduler's copy of the registry's tenants and servers (`registry_copy`)."""
    return copy_resource(
        settings,
        "scheduler",
        lambda sessions, opened: RegistryCopy(
            sessions, opened, resync_seconds=settings.copy_resync_seconds
        ),
        source,
        run_loop=run_loop,
    )


def mailbox_reader(
    settings: SchedulerSettings,
    source: Callable[[FastAPI], AsyncIterator[inbox.MailboxSource]],
    *,
    run_loop: bool = True,
) -> Resource:
    """The mailbox reader (`services.scheduler.inbox`) and its loop; `source` opens what it
    reads the registry through, for as long as the reader runs. Needs `app.state.sessions`."""

    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        async with asynccontextmanager(source)(app) as opened:
            reader = inbox.MailboxReader(
                settings,
                app.state.sessions,
                opened,
                allow_private=settings.allow_private_hosts,
                allowed_ports=settings.allowed_imap_ports,
                broadcast=partial(service.broadcast_cancel, app.state.bus, settings),
                paused=copy.refresh_server if (copy := _copy_of(app)) else None,
            )
            app.state.mailbox_reader = reader
            try:
                async with background_loops(*([reader.run] if run_loop else []), grace_seconds=10):
                    yield
            finally:
                reader.close()

    return resource


def _copy_of(app: FastAPI) -> RegistryCopy | None:
    copy: RegistryCopy | None = getattr(app.state, "copies", {}).get("scheduler")
    return copy


async def registry_over_http(app: FastAPI) -> AsyncIterator[inbox.MailboxSource]:
    settings: SchedulerSettings = app.state.settings
    async with httpx.AsyncClient(
        base_url=settings.registry_url, timeout=settings.inbox_timeout_seconds
    ) as client:
        yield HttpMailboxSource(
            client, settings.internal_token.get_secret_value(), app.state.sessions
        )


def install(app: FastAPI) -> None:
    app.include_router(router)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # POST /v1/messages parses its body itself (one email or a batch), so the two body
        # schemas it refers to are added to the components here.
        if app.openapi_schema is None:
            schema = generate()
            batch = TypeAdapter(MessageBatch).json_schema(ref_template=REF_TEMPLATE)
            add_component(schema, "MessageBatch", batch)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: SchedulerSettings | None = None) -> FastAPI:
    resolved = settings or SchedulerSettings()
    app = build_app(
        title="ABillionLeads scheduler",
        service="scheduler",
        settings=resolved,
        resources=[
            database(resolved),
            rabbit_bus(resolved),
            scheduler_copy(resolved, registry_source_over_http),
            scheduler_resources(resolved),
            mailbox_reader(resolved, registry_over_http),
        ],
    )
    install(app)
    return app
