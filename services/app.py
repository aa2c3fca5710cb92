"""All services in one process: what `make run` serves, on SQLite and the in-process bus.

This module is the one place that knows both sides: the sender's ports are wired to the
registry's and the scheduler's use cases as plain function calls, not HTTP to itself.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime

from fastapi import FastAPI
from sqlalchemy.exc import DBAPIError

from services.registry import changes as registry_changes
from services.registry import credentials as registry_use_cases
from services.registry import mailbox as registry_mailbox
from services.registry import main as registry
from services.registry.domain import ServerStatus
from services.registry.oauth.tokens import TokenUnavailable
from services.scheduler import inbox
from services.scheduler import main as scheduler
from services.scheduler import repository as scheduler_repository
from services.scheduler.mailbox_source import endpoint_of, listed_mailboxes
from services.sender import main as sender
from services.sender.clients import DependencyUnavailable, JobKey
from services.webhooks import main as webhooks
from shared.app import build_app, database
from shared.bus_resource import in_process_bus
from shared.errors import ServerNotFound
from shared.imap import ImapEndpoint
from shared.messages import PollReputation, SendResult, SmtpCredentials
from shared.pagination import decode_cursor
from shared.registry_changes import RegistrySource, ServerCopyPage, TenantCopyPage
from shared.settings import Settings, get_settings


async def in_process_ports(app: FastAPI, _: AsyncExitStack) -> sender.Ports:
    sessions = app.state.sessions

    async def fetch(
        server_id: uuid.UUID, rejected_token: str | None = None
    ) -> SmtpCredentials | None:
        try:
            async with sessions() as session:
                return await registry_use_cases.server_credentials(
                    session,
                    app.state.keyring,
                    app.state.token_keeper,
                    server_id,
                    rejected_token=rejected_token,
                )
        except DBAPIError as exc:
            raise DependencyUnavailable("database unavailable") from exc
        except TokenUnavailable as exc:
            raise DependencyUnavailable("OAuth provider unavailable") from exc

    async def refresh(server_id: uuid.UUID, rejected_token: str) -> SmtpCredentials | None:
        return await fetch(server_id, rejected_token)

    async def report(server_id: uuid.UUID, reply: str) -> None:
        try:
            async with sessions() as session, session.begin():
                await registry_use_cases.record_health(
                    session, server_id, ServerStatus.auth_failed, reply
                )
        except ServerNotFound:
            return  # deleted meanwhile: nobody to tell
        except DBAPIError as exc:
            raise DependencyUnavailable("database unavailable") from exc

    class InProcessJobStates:
        async def sendable(self, jobs: Iterable[JobKey]) -> set[uuid.UUID]:
            try:
                async with sessions() as session:
                    return await scheduler_repository.sendable_jobs(session, list(jobs))
            except DBAPIError as exc:
                raise DependencyUnavailable("database unavailable") from exc

        async def report(self, result: SendResult) -> None:
            try:
                await app.state.result_applier.apply_many([result])
            except DBAPIError as exc:
                raise DependencyUnavailable("database unavailable") from exc

    return sender.Ports(fetch, report, InProcessJobStates(), refresh)


class InProcessMailboxes:
    """The mailbox reader's `MailboxSource` as calls of the registry's use cases."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.sessions = app.state.sessions

    async def mailboxes(self) -> list[inbox.MailboxRef]:
        return await listed_mailboxes(self.sessions)

    async def endpoint(
        self, server_id: uuid.UUID, rejected: str | None = None
    ) -> ImapEndpoint | None:
        try:
            async with self.sessions() as session:
                found = await registry_mailbox.imap_credentials(
                    session,
                    self.app.state.keyring,
                    self.app.state.token_keeper,
                    server_id,
                    rejected_token=rejected,
                )
        except TokenUnavailable as exc:
            raise inbox.AccessUnavailable("the OAuth provider cannot refresh now") from exc
        return endpoint_of(found) if found is not None else None

    async def report(
        self,
        server_id: uuid.UUID,
        at: datetime,
        error: str | None,
        reputation: PollReputation | None = None,
    ) -> None:
        async with self.sessions() as session, session.begin():
            await registry_mailbox.record_poll(session, server_id, at, error, reputation)

    async def pause(self, server_id: uuid.UUID, reason: str) -> None:
        async with self.sessions() as session, session.begin():
            await registry_use_cases.pause_for_bounces(session, server_id, reason)


class InProcessRegistry:
    """The copies' `RegistrySource` as calls of the registry's snapshot reads."""

    def __init__(self, app: FastAPI) -> None:
        self.sessions = app.state.sessions

    async def tenants(
        self, *, cursor: str | None, limit: int, key_digest: str | None = None
    ) -> TenantCopyPage:
        async with self.sessions() as session:
            return await registry_changes.tenant_copies(
                session, after=_after(cursor), limit=limit, key_digest=key_digest
            )

    async def servers(
        self, *, cursor: str | None, limit: int, tenant_id: uuid.UUID | None = None
    ) -> ServerCopyPage:
        async with self.sessions() as session:
            return await registry_changes.server_copies(
                session, after=_after(cursor), limit=limit, tenant_id=tenant_id
            )


def _after(cursor: str | None) -> uuid.UUID | None:
    return decode_cursor(cursor) if cursor else None


@asynccontextmanager
async def in_process_registry(app: FastAPI) -> AsyncIterator[RegistrySource]:
    yield InProcessRegistry(app)


async def in_process_mailboxes(app: FastAPI) -> AsyncIterator[inbox.MailboxSource]:
    yield InProcessMailboxes(app)


def create_app(
    settings: Settings | None = None, *, run_loops: bool = True, follow_registry: bool = True
) -> FastAPI:
    """Every service in one app; `run_loops=False` leaves dispatching and sending to a test.
    `follow_registry=False` also stops the copies of the registry following its changes in
    the background (they are then filled on demand only): for a client that sends requests
    from another event loop than the app's, which the background tasks' pool would refuse."""
    resolved = settings or get_settings()
    app = build_app(
        title="ABillionLeads sending API",
        service="all",
        settings=resolved,
        resources=[
            database(resolved),
            in_process_bus(),
            # Before the services whose events it consumes: it stops after their last publish.
            webhooks.webhooks_resources(resolved, run_loop=run_loops),
            registry.registry_resources(
                resolved,
                run_loop=run_loops,
                recover_in_memory=True,
                relay_changes=follow_registry,
            ),
            # Kept current whether or not the loops run: tests that drive dispatch themselves
            # still see the servers they add and the keys they make.
            scheduler.scheduler_copy(resolved, in_process_registry, run_loop=follow_registry),
            webhooks.webhooks_copy(resolved, in_process_registry, run_loop=follow_registry),
            scheduler.scheduler_resources(resolved, run_loop=run_loops, recover_in_memory=True),
            *([sender.sender_resources(resolved, ports=in_process_ports)] if run_loops else []),
            scheduler.mailbox_reader(resolved, in_process_mailboxes, run_loop=run_loops),
        ],
    )
    registry.install(app)
    scheduler.install(app)
    webhooks.install(app)
    return app
