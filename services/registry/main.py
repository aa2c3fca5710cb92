"""The registry service: create_app and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.registry import changes, events
from services.registry.api import router
from services.registry.models import RegistryChangesOutbox, RegistryOutbox
from services.registry.oauth import providers as oauth_providers
from services.registry.oauth.client import OAuthClient
from services.registry.oauth.tokens import TokenKeeper
from services.registry.repository import RegistryTenants
from services.registry.service import CheckLimiter
from services.registry.verifier import Verifier
from shared.app import Resource, background_loops, build_app, database
from shared.bus_resource import rabbit_bus
from shared.crypto import Keyring
from shared.events import EVENTS_PER_MESSAGE
from shared.outbox import Outbox
from shared.settings import REGISTRY_COPY_KEEPERS, RegistrySettings
from shared.tenancy import add_tenant_lookup


def registry_resources(
    settings: RegistrySettings,
    *,
    run_loop: bool = True,
    recover_in_memory: bool = False,
    relay_changes: bool = True,
) -> Resource:
    """Needs `app.state.sessions` and `app.state.bus` from resources opened before it.

    `recover_in_memory`: the in-process bus lost its messages with the last process, so the
    outbox publishes again what it published within its keep window.
    """

    @asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        keyring = Keyring.from_keys(settings.keys)
        app.state.keyring = keyring
        app.state.check_limiter = CheckLimiter(settings)
        providers = oauth_providers.configured(settings)
        client = OAuthClient(settings.oauth_http_timeout_seconds)
        app.state.oauth_providers = providers
        app.state.oauth_client = client
        # Needs the database resource's session factory, which is entered first.
        app.state.token_keeper = TokenKeeper(
            app.state.sessions, keyring, client, providers, settings.oauth_refresh_margin_seconds
        )
        app.state.verifier = Verifier(settings, app.state.token_keeper)
        events.install()
        relay = Outbox(
            RegistryOutbox,
            app.state.sessions,
            app.state.bus,
            settings.events_queue,
            per_message=EVENTS_PER_MESSAGE,
            service="registry",
            poll_seconds=settings.outbox_poll_seconds,
            keep_seconds=settings.outbox_keep_seconds,
        )
        app.state.registry_outbox = relay
        changes.install()
        # Every tenant and server change, to each service that keeps a copy of them.
        copies = Outbox(
            RegistryChangesOutbox,
            app.state.sessions,
            app.state.bus,
            [settings.registry_changes_queue(service) for service in REGISTRY_COPY_KEEPERS],
            service="registry",
            poll_seconds=settings.outbox_poll_seconds,
            keep_seconds=settings.outbox_keep_seconds,
        )
        app.state.registry_changes = copies
        add_tenant_lookup(app, "registry", RegistryTenants(app.state.sessions))
        if recover_in_memory:
            await relay.republish_recent()
            await copies.republish_recent()
        # The copies' relay runs even without `run_loop` (tests that drive dispatch and
        # sending themselves): the other services' view of tenants and servers is plumbing.
        loops = ([copies.run] if relay_changes else []) + ([relay.run] if run_loop else [])
        async with background_loops(*loops):
            yield

    return resource


def install(app: FastAPI) -> None:
    app.include_router(router)


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    resolved = settings or RegistrySettings()
    app = build_app(
        title="ABillionLeads registry",
        service="registry",
        settings=resolved,
        resources=[
            database(resolved),
            rabbit_bus(resolved, needed_for_readiness=False),
            registry_resources(resolved),
        ],
    )
    install(app)
    return app
