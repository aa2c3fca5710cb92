"""End to end on this machine: emails per second from POST /v1/messages to accepted by a local
SMTP sink (STARTTLS, AUTH, no added delay), with pacing off, in both shapes, beside two
baselines to the same sink in the same run: a bare aiosmtplib loop over 6 sessions kept open
(the ceiling) and a Celery + smtplib worker pool (concurrency 8, a new STARTTLS + AUTH
connection per email: what the product must beat). Each figure comes with the CPU seconds per
1,000 emails of every process involved, read from /proc.

Then scale-out: the stack with 4 senders against 1, to a sink that waits 50 ms before each reply.

    .venv/bin/python -m bench.e2e --emails 1500 --scale-emails 600
    .venv/bin/python -m bench.e2e --shapes single --scale-emails 0   # one shape, quicker
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

from bench import celery_baseline
from bench.proc import cpu_seconds
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


async def bare_loop(port: int, emails: int, context: ssl.SSLContext) -> tuple[float, float]:
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

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(session(emails // sessions) for _ in range(sessions)))
    return (emails // sessions * sessions) / (time.perf_counter() - started), (
        time.process_time() - cpu
    )


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


def through_the_product(
    base_url: str, settings: Settings, sink_port: int, emails: int, pids: list[int]
) -> tuple[float, list[float]]:
    """Emails per second, and the CPU seconds each of `pids` spent meanwhile."""
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
    cpu_before = [cpu_seconds(pid) for pid in pids]
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
            cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
            assert count_sent(client, tenant) == emails, "not every email was sent"
            return emails / elapsed, cpu
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


def per_thousand(cpu: float, emails: int) -> str:
    return f"{cpu * 1000 / emails:6.2f}"


def run_stack(
    workdir: Path, sink_port: int, emails: int, senders: int, extra: dict[str, str]
) -> tuple[float, dict[str, float]]:
    """The stack as separate processes on a fresh database; emails/s and CPU per process."""
    url = asyncio.run(fresh_postgres())
    stack = make_settings(url, amqp_url=AMQP, queue_prefix=f"abl-bench-{uuid.uuid4().hex[:6]}")
    services: list[Service] = []
    try:
        upgrade_database(url)
        env = service_env(stack, **extra)
        registry = start("registry", "registry", env, workdir)
        env |= {"ABL_REGISTRY_URL": registry.url}  # the scheduler's copy of the registry
        scheduler = start("scheduler", "scheduler", env, workdir)
        env |= {"ABL_SCHEDULER_URL": scheduler.url}
        services += [registry, scheduler]
        services += [start(f"sender-{n}", "sender", env, workdir) for n in range(senders)]
        services.append(start("gateway", "gateway", env, workdir))
        pids = [service.process.pid for service in services]
        rate, cpu = through_the_product(services[-1].url, stack, sink_port, emails, pids)
        return rate, {service.name: seconds for service, seconds in zip(services, cpu, strict=True)}
    finally:
        for service in services:
            service.stop()
        asyncio.run(drop_postgres(url))
        asyncio.run(delete_queues(AMQP, stack))


def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="abl-bench-e2e-"))
    ca = trustme.CA()
    ca_file, cert_file, key_file = (str(workdir / n) for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(ca_file)
    leaf = ca.issue_cert(HOST, "localhost")
    leaf.private_key_pem.write_to_path(key_file)
    Path(cert_file).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    extra = {"SSL_CERT_FILE": ca_file, "ABL_TICK_SECONDS": "0.2"}
    n = args.emails
    sink_port = free_port()
    sink = start_sink(sink_port, 0.0, cert_file, key_file)
    try:
        context = ssl.create_default_context(cafile=ca_file)
        bare, bare_cpu = asyncio.run(bare_loop(sink_port, n, context))
        print(f"{n} emails each, one SMTP sink (STARTTLS, AUTH), pacing off")
        print(f"{'contender':48} {'emails/s':>9} {'vs bare':>8} {'vs celery':>9}  CPU s/1000")
        print(
            f"{'bare aiosmtplib loop, 6 sessions kept open':48} {bare:9.1f} {1:8.2f}x "
            f"{'':9}  {per_thousand(bare_cpu, n)}"
        )
        celery, celery_cpu = celery_baseline.run(n, AMQP, sink_port, ca_file, workdir)
        print(
            f"{'Celery prefork x8 + smtplib, new connection each':48} {celery:9.1f} "
            f"{celery / bare:8.2f}x {1:8.2f}x  {per_thousand(celery_cpu, n)}"
        )

        if "single" in args.shapes:
            single = make_settings(f"sqlite:///{workdir / 'single.db'}")
            service = start("all", "all", service_env(single, **extra), workdir)
            try:
                rate, (cpu,) = through_the_product(
                    service.url, single, sink_port, n, [service.process.pid]
                )
            finally:
                service.stop()
            print(
                f"{'make run shape (one process, SQLite)':48} {rate:9.1f} {rate / bare:8.2f}x "
                f"{rate / celery:8.2f}x  {per_thousand(cpu, n)}  "
                f"({cpu / bare_cpu:.1f}x the bare CPU)"
            )
        if "stack" in args.shapes:
            rate, cpus = run_stack(workdir, sink_port, n, 2, extra)
            total = sum(cpus.values())
            print(
                f"{'stack shape (5 processes, PostgreSQL, RabbitMQ)':48} {rate:9.1f} "
                f"{rate / bare:8.2f}x {rate / celery:8.2f}x  {per_thousand(total, n)}  "
                f"({total / bare_cpu:.1f}x the bare CPU)"
            )
            for name, seconds in cpus.items():
                print(f"    {name:44} {'':9} {'':8} {'':9}  {per_thousand(seconds, n)}")
    finally:
        sink.terminate()
        sink.wait()

    if args.scale_emails:
        sink_port = free_port()
        sink = start_sink(sink_port, 0.05, cert_file, key_file)
        try:
            one, _ = run_stack(workdir, sink_port, args.scale_emails, 1, extra)
            four, _ = run_stack(workdir, sink_port, args.scale_emails, 4, extra)
            print(
                f"scale-out, sink waiting 50 ms per reply, {args.scale_emails} emails: "
                f"1 sender {one:.1f} emails/s, 4 senders {four:.1f} emails/s, "
                f"ratio {four / one:.2f}x"
            )
        finally:
            sink.terminate()
            sink.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--emails", type=int, default=1500)
    parser.add_argument("--scale-emails", type=int, default=600, help="0 skips the scale-out")
    parser.add_argument(
        "--shapes",
        type=lambda text: set(text.split(",")),
        default={"single", "stack"},
        help="which shapes to measure: single, stack or single,stack",
    )
    main(parser.parse_args())
