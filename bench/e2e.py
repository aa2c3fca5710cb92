"""End to end on this machine: emails per second from POST /v1/messages to accepted by a local
SMTP sink (STARTTLS, AUTH, no added delay), with pacing off, in both shapes, beside a bare
aiosmtplib loop to the same sink in the same run.

    .venv/bin/python -m bench.e2e --emails 1500
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

import aiosmtplib
import asyncpg
import httpx
import trustme
from sqlalchemy import text

from bench.sender import HOST, start_sink
from shared.db import create_engine
from shared.migrate import upgrade_database
from shared.settings import Settings
from tests.conftest import make_settings
from tests.support.processes import Service, delete_queues, service_env, start
from tests.support.smtp import free_port

SERVERS = 3
CONNECTIONS_PER_SERVER = 2
PG = "postgresql://postgres@127.0.0.1:5432"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"


async def bare_loop(port: int, emails: int, context: ssl.SSLContext) -> float:
    """The same number of emails over the same number of sessions, kept open: the ceiling."""
    sessions = SERVERS * CONNECTIONS_PER_SERVER
    message = b"From: a@example.com\r\nTo: lead@example.org\r\nSubject: Hi\r\n\r\nHello\r\n"

    async def session(share: int) -> None:
        client = aiosmtplib.SMTP(hostname=HOST, port=port, start_tls=True, tls_context=context)
        await client.connect()
        await client.login("bench", "pw")
        for i in range(share):
            await client.sendmail("a@example.com", [f"lead{i}@example.org"], message)
        await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(session(emails // sessions) for _ in range(sessions)))
    return (emails // sessions * sessions) / (time.perf_counter() - started)


def warm(settings: Settings) -> None:
    async def run() -> None:
        engine = create_engine(settings.database_url)
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO server_warmup (server_id, tenant_id, step, state_day, "
                    "idle_days) SELECT id, tenant_id, 14, :day, 0 FROM smtp_servers"
                ),
                {"day": date.today()},
            )
        await engine.dispose()

    asyncio.run(run())


def through_the_product(base_url: str, settings: Settings, sink_port: int, emails: int) -> float:
    admin = {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}
    client = httpx.Client(base_url=base_url, timeout=60)
    key = client.post("/v1/tenants", json={"name": "bench"}, headers=admin).json()["api_key"]
    tenant = {"Authorization": f"Bearer {key}"}
    for n in range(SERVERS):
        login = f"sender{n}@example.com"
        response = client.post(
            "/v1/servers",
            headers=tenant,
            json={
                "host": HOST,
                "port": sink_port,
                "security": "starttls",
                "username": login,
                "password": "pw",
                "from_email": login,
            },
        )
        assert response.status_code == 201, response.text
    warm(settings)
    started = time.perf_counter()
    for offset in range(0, emails, 1000):
        batch = {
            "messages": [
                {"to": f"lead{i}@example.org", "subject": "Hi", "text": "Hello"}
                for i in range(offset, min(emails, offset + 1000))
            ]
        }
        assert client.post("/v1/messages", json=batch, headers=tenant).status_code == 202
    while True:
        # Cheap polls (one row each), so that watching does not load what is measured.
        pending = [
            client.get("/v1/messages", params={"status": s, "limit": 1}, headers=tenant).json()[
                "items"
            ]
            for s in ("queued", "scheduled")
        ]
        if not any(pending):
            elapsed = time.perf_counter() - started
            assert count_sent(client, tenant) == emails, "not every email was sent"
            return emails / elapsed
        time.sleep(0.1)


def count_sent(client: httpx.Client, tenant: dict[str, str]) -> int:
    total, cursor = 0, None
    while True:
        params: dict[str, str | int] = {"status": "sent", "limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/messages", params=params, headers=tenant).json()
        total += len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return total


async def fresh_postgres() -> str:
    name = f"abl_e2e_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{PG}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    return f"{PG}/{name}"


async def drop_postgres(url: str) -> None:
    admin = await asyncpg.connect(f"{PG}/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    await admin.close()


def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="abl-bench-e2e-"))
    ca = trustme.CA()
    ca_file, cert_file, key_file = (str(workdir / n) for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(ca_file)
    leaf = ca.issue_cert(HOST, "localhost")
    leaf.private_key_pem.write_to_path(key_file)
    Path(cert_file).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    sink_port = free_port()
    sink = start_sink(sink_port, 0.0, cert_file, key_file)
    services: list[Service] = []
    try:
        context = ssl.create_default_context(cafile=ca_file)
        bare = asyncio.run(bare_loop(sink_port, args.emails, context))
        print(
            f"bare aiosmtplib loop, {SERVERS * CONNECTIONS_PER_SERVER} sessions kept open: "
            f"{bare:7.1f} emails/s"
        )
        extra = {"SSL_CERT_FILE": ca_file, "ABL_TICK_SECONDS": "0.2"}

        single = make_settings(f"sqlite:///{workdir / 'single.db'}")
        services.append(start("all", "all", service_env(single, **extra), workdir))
        rate = through_the_product(services[-1].url, single, sink_port, args.emails)
        print(
            f"make run shape (one process, SQLite):      {rate:7.1f} emails/s  "
            f"ratio {rate / bare:.2f}x"
        )
        services.pop().stop()

        url = asyncio.run(fresh_postgres())
        stack = make_settings(url, amqp_url=AMQP, queue_prefix=f"abl-bench-{uuid.uuid4().hex[:6]}")
        try:
            upgrade_database(url)
            env = service_env(stack, **extra)
            registry = start("registry", "registry", env, workdir)
            scheduler = start("scheduler", "scheduler", env, workdir)
            env |= {"ABL_REGISTRY_URL": registry.url, "ABL_SCHEDULER_URL": scheduler.url}
            services += [registry, scheduler]
            services += [start(f"sender-{n}", "sender", env, workdir) for n in range(2)]
            services.append(start("gateway", "gateway", env, workdir))
            rate = through_the_product(services[-1].url, stack, sink_port, args.emails)
            print(
                f"stack shape (5 processes, PostgreSQL, RabbitMQ): {rate:7.1f} emails/s  "
                f"ratio {rate / bare:.2f}x"
            )
        finally:
            for service in services:
                service.stop()
            asyncio.run(drop_postgres(url))
            asyncio.run(delete_queues(AMQP, stack))
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--emails", type=int, default=1500)
    main(parser.parse_args())
