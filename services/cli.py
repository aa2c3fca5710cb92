"""Operational commands: serve, migrate, rotate-keys, generate-key.

`python -m services.cli serve` is what `make run` calls: in development it writes random
secrets to a git-ignored file on first run, migrates the database and serves the API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from shared.crypto import Keyring, generate_key
from shared.settings import (
    CommonSettings,
    DatabaseSettings,
    GatewaySettings,
    RegistrySettings,
    SchedulerSettings,
    SenderSettings,
    Settings,
    SettingsError,
    WebhookSettings,
    warn_unused_secrets,
)

DEV_ENV_FILE = Path(".abl/dev.env")
SettingsT = TypeVar("SettingsT", bound=CommonSettings)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from the first byte (no chmod after the fact),
    in a folder only its owner can enter."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask, and the folder may exist
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    path.chmod(0o600)  # O_CREAT's mode does not apply to a file that already existed


def ensure_dev_env(path: Path = DEV_ENV_FILE, wanted: Iterable[str] | None = None) -> Path:
    """Write development secrets once; load those in `wanted` (all by default) without
    overriding the environment, so each service of `make stack` gets only its own."""
    if not path.exists():
        lines = [
            f"ABL_ADMIN_TOKEN={secrets.token_urlsafe(32)}",
            f"ABL_INTERNAL_TOKEN={secrets.token_urlsafe(32)}",
            f"ABL_ENCRYPTION_KEYS={generate_key()}",
            f"ABL_UNSUBSCRIBE_KEY={secrets.token_urlsafe(32)}",
        ]
        write_private(path, "\n".join(lines) + "\n")
    names = None if wanted is None else {name.upper() for name in wanted}
    for line in path.read_text().splitlines():
        name, _, value = line.partition("=")
        name = name.strip()
        if name and not line.startswith("#") and (names is None or name.upper() in names):
            os.environ.setdefault(name, value.strip())
    return path


def load_settings(kind: type[SettingsT]) -> SettingsT:
    """The settings of one service (`Settings` for the one-process shape)."""
    if os.environ.get("ABL_ENV", "production") == "development":
        path = ensure_dev_env(wanted=(f"ABL_{name}" for name in kind.model_fields))
        print(f"development secrets (admin token, encryption key): {path.resolve()}")
    try:
        return kind()
    except (SettingsError, ValueError) as exc:
        sys.exit(f"configuration error: {exc}")


class GracefulServer(uvicorn.Server):
    """uvicorn, except that a SIGTERM or SIGINT that ended in a clean shutdown exits 0.

    uvicorn raises the signal again after shutting down (exit status 143), and restores the
    default handlers, so a second SIGTERM during the last moments (as honcho or a supervisor
    sends) would kill the process. Here the handler stays until the process ends.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


def cmd_serve(args: argparse.Namespace) -> None:
    from fastapi import FastAPI

    from shared.logs import configure_logging
    from shared.migrate import upgrade_when_reachable

    settings: CommonSettings
    app: FastAPI
    if args.service == "all":
        from services.app import create_app as create_all

        settings = combined = load_settings(Settings)
        app = create_all(combined)
    elif args.service == "registry":
        from services.registry.main import create_app as create_registry

        settings = registry = load_settings(RegistrySettings)
        app = create_registry(registry)
    elif args.service == "scheduler":
        from services.scheduler.main import create_app as create_scheduler

        settings = scheduler = load_settings(SchedulerSettings)
        app = create_scheduler(scheduler)
    elif args.service == "sender":
        from services.sender.main import create_app as create_sender

        settings = sender = load_settings(SenderSettings)
        app = create_sender(sender)
    elif args.service == "webhooks":
        from services.webhooks.main import create_app as create_webhooks

        settings = webhooks = load_settings(WebhookSettings)
        app = create_webhooks(webhooks)
    else:
        from services.gateway.main import create_app as create_gateway

        settings = gateway = load_settings(GatewaySettings)
        app = create_gateway(gateway)
    configure_logging(settings.log_level)
    warn_unused_secrets(args.service, type(settings), os.environ)
    if args.migrate and isinstance(settings, DatabaseSettings):  # no database for the others
        upgrade_when_reachable(settings.database_url)
    print(f"{args.service}: serving on http://{settings.host}:{settings.port} (docs at /docs)")
    GracefulServer(server_config(app, settings)).run()


def server_config(app: Any, settings: CommonSettings) -> uvicorn.Config:
    from shared.logs import redact_access_log

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # Longer than the sender's drain, which runs in the lifespan's shutdown.
        timeout_graceful_shutdown=int(settings.sender_drain_seconds) + 5,
    )
    # After the Config: it has just applied uvicorn's logging configuration.
    redact_access_log()
    return config


def cmd_migrate(_: argparse.Namespace) -> None:
    from shared.migrate import upgrade_database

    # The migration job needs the database URL and nothing else.
    settings = load_settings(DatabaseSettings)
    upgrade_database(settings.database_url)
    print("database is at the latest revision")


def cmd_ensure_database(_: argparse.Namespace) -> None:
    """Create the PostgreSQL database named by ABL_DATABASE_URL if it does not exist, then
    migrate it. SQLite files are created by the migration itself."""
    from sqlalchemy.engine import make_url

    from shared.migrate import upgrade_database

    settings = load_settings(DatabaseSettings)
    url = make_url(settings.database_url)
    if url.get_backend_name() in ("postgresql", "postgres") and url.database:
        import asyncpg

        async def create() -> None:
            admin = url.set(drivername="postgresql", database="postgres")
            connection = await asyncpg.connect(admin.render_as_string(hide_password=False))
            try:
                exists = await connection.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", url.database
                )
                if not exists:
                    await connection.execute(f'CREATE DATABASE "{url.database}"')
                    print(f"created database {url.database}")
            finally:
                await connection.close()

        asyncio.run(create())
    upgrade_database(settings.database_url)
    print("database is at the latest revision")


def cmd_rotate_keys(_: argparse.Namespace) -> None:
    from services.registry.keys import rotate_keys
    from services.webhooks.keys import reencrypt_secrets
    from shared.db import create_engine, session_factory

    settings = load_settings(RegistrySettings)

    async def run() -> None:
        engine = create_engine(settings.database_url)
        keyring = Keyring.from_keys(settings.keys)
        try:
            report = await rotate_keys(session_factory(engine), keyring)
            endpoints, hooks = await reencrypt_secrets(session_factory(engine), keyring)
        finally:
            await engine.dispose()
        print(
            f"examined {report.examined} servers, re-encrypted {report.reencrypted}; examined "
            f"{endpoints} webhook endpoints, re-encrypted {hooks}; under key "
            f"{keyring.primary_id}"
        )

    asyncio.run(run())


def cmd_generate_key(_: argparse.Namespace) -> None:
    print(generate_key())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="abl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="migrate, then serve the API")
    serve.add_argument(
        "--service",
        choices=("all", "registry", "scheduler", "sender", "webhooks", "gateway"),
        default="all",
        help="all: every service in one process on the in-process bus (make run)",
    )
    serve.add_argument("--no-migrate", dest="migrate", action="store_false")
    serve.set_defaults(func=cmd_serve)
    commands.add_parser("migrate", help="upgrade the database").set_defaults(func=cmd_migrate)
    commands.add_parser(
        "ensure-database", help="create the PostgreSQL database if missing, then migrate"
    ).set_defaults(func=cmd_ensure_database)
    commands.add_parser(
        "rotate-keys", help="re-encrypt every password under the first ABL_ENCRYPTION_KEYS key"
    ).set_defaults(func=cmd_rotate_keys)
    commands.add_parser("generate-key", help="print a new encryption key").set_defaults(
        func=cmd_generate_key
    )
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
