"""One scheduler tick over many servers and queued emails in PostgreSQL, publishing to RabbitMQ.

Prints the time to compute allowances and dispatch, and the jobs published per second with
confirms, beside two baselines measured in the same run: one bulk SQL UPDATE that marks the
same number of emails (the floor for touching those rows), and a bare aio-pika loop publishing
the same number of messages of the same size with confirms at the same concurrency.

    .venv/bin/python -m bench.scheduler_tick --servers 100000 --emails 1000000 --tenants 1000
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
import uuid

import aio_pika
import asyncpg

from services.scheduler.dispatcher import Dispatcher
from shared.broker import RabbitBus
from shared.crypto import generate_key
from shared.migrate import upgrade_database
from shared.settings import Settings
from shared.timeutil import new_id, utcnow

PG = "postgresql://postgres@127.0.0.1:5432"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"


async def seed(url: str, tenants: int, servers: int, emails: int) -> None:
    connection = await asyncpg.connect(url)
    now = utcnow()
    tenant_ids = [new_id() for _ in range(tenants)]
    await connection.copy_records_to_table(
        "tenants",
        records=[
            (f"t{i}", t, secrets.token_hex(32), "abl_x", now) for i, t in enumerate(tenant_ids)
        ],
        columns=["name", "id", "api_key_hash", "api_key_prefix", "created_at"],
    )
    await connection.copy_records_to_table(
        "smtp_servers",
        records=[
            (
                "",
                "",
                500,
                new_id(),
                tenant_ids[i % tenants],
                f"smtp{i}.example.com",
                587,
                "starttls",
                f"user{i}",
                f"user{i}@example.com",
                "v1:x:y",
                "active",
                now,
                now,
            )
            for i in range(servers)
        ],
        columns=[
            "label",
            "from_name",
            "daily_cap",
            "id",
            "tenant_id",
            "host",
            "port",
            "security",
            "username",
            "from_email",
            "password_ciphertext",
            "status",
            "created_at",
            "updated_at",
        ],
    )
    batch = 100_000
    for start in range(0, emails, batch):
        await connection.copy_records_to_table(
            "emails",
            records=[
                (
                    f"lead{i}@example.org",
                    f"Subject {i}",
                    "Hello",
                    new_id(),
                    tenant_ids[i % tenants],
                    "queued",
                    "{}",
                    f"abl.{i}",
                    0,
                    now,
                    now,
                    now,
                )
                for i in range(start, min(emails, start + batch))
            ],
            columns=[
                "to",
                "subject",
                "text",
                "id",
                "tenant_id",
                "status",
                "headers",
                "message_id",
                "attempts",
                "not_before",
                "created_at",
                "updated_at",
            ],
        )
    await connection.execute("ANALYZE")
    await connection.close()


async def bulk_update_baseline(url: str, count: int) -> float:
    connection = await asyncpg.connect(url)
    started = time.perf_counter()
    async with connection.transaction():
        await connection.execute(
            "UPDATE emails SET updated_at = now() WHERE id IN "
            "(SELECT id FROM emails ORDER BY id LIMIT $1)",
            count,
        )
        elapsed = time.perf_counter() - started
    await connection.close()
    return elapsed


async def publish_baseline(count: int, size: int, concurrency: int) -> float:
    connection = await aio_pika.connect(AMQP)
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(
        f"abl-bench-bare-{uuid.uuid4().hex[:6]}",
        durable=True,
        arguments={"x-queue-type": "quorum"},
    )
    body = b"x" * size
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name,
            )

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - started
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    return elapsed


async def main(args: argparse.Namespace) -> None:
    name = f"abl_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{PG}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG}/{name}"
    prefix = f"abl-bench-{uuid.uuid4().hex[:6]}"
    try:
        await asyncio.to_thread(upgrade_database, url)
        started = time.perf_counter()
        await seed(url, args.tenants, args.servers, args.emails)
        print(
            f"seeded {args.tenants} tenants, {args.servers} servers, {args.emails} emails "
            f"in {time.perf_counter() - started:.1f} s"
        )
        settings = Settings(
            admin_token="x" * 32,
            internal_token="y" * 32,
            encryption_keys=generate_key(),
            database_url=url,
            pacing=False,
            queue_prefix=prefix,
        )
        from shared.db import create_engine, session_factory

        engine = create_engine(url)
        bus = RabbitBus(AMQP)
        await bus.connect()
        dispatcher = Dispatcher(settings, session_factory(engine), bus)
        report = await dispatcher.tick()
        await bus.close()
        await engine.dispose()

        jobs = report.dispatched
        size = 400
        bulk = await bulk_update_baseline(url, jobs)
        bare = await publish_baseline(jobs, size, concurrency=args.publish_concurrency)
        publish_rate = jobs / report.publish_seconds if report.publish_seconds else 0.0
        bare_rate = jobs / bare
        print(f"tick: dispatched {jobs} jobs in {report.total_seconds:.1f} s")
        print(
            f"  compute allowances + dispatch: {report.dispatch_seconds:.1f} s "
            f"(baseline bulk UPDATE of {jobs} rows: {bulk:.2f} s; "
            f"ratio {report.dispatch_seconds / bulk:.1f}x)"
        )
        print(
            f"  publish with confirms: {publish_rate:,.0f} jobs/s "
            f"(bare aio-pika loop: {bare_rate:,.0f} msg/s; ratio {publish_rate / bare_rate:.2f}x)"
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        connection = await aio_pika.connect(AMQP)
        channel = await connection.channel()
        for queue in (f"{prefix}.send-jobs", f"{prefix}.send-jobs.dead"):
            await channel.queue_delete(queue)
        await connection.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--servers", type=int, default=100_000)
    parser.add_argument("--emails", type=int, default=1_000_000)
    parser.add_argument("--publish-concurrency", type=int, default=256)
    asyncio.run(main(parser.parse_args()))
