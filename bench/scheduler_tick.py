"""One scheduler tick over many servers and queued emails in PostgreSQL, publishing to RabbitMQ.

Prints the time to compute allowances, reserve and mark (the dispatch), and the jobs published
per second with confirms, beside two baselines measured in the same run: one bulk SQL UPDATE
that marks the same number of emails (the floor for touching those rows), and a bare aio-pika
loop publishing as many messages of the same size with confirms and the same window. Then the
process's memory after each of `--rounds` ticks over freshly queued emails, and scale-out:
the same queue dispatched by 2 scheduler processes against 1 (advisory locks share the
tenants out), beside the same scale-out for bare aio-pika publishers into one queue (what the
broker and the machine allow at all).

    .venv/bin/python -m bench.scheduler_tick                 # small: 100 tenants, 2k servers
    .venv/bin/python -m bench.scheduler_tick --full          # the design: 1k, 100k, 1M
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import time
import uuid

import aio_pika
import asyncpg

from bench.proc import rss_mib
from services.scheduler.dispatcher import PUBLISH_WINDOW, Dispatcher
from shared.broker import RabbitBus
from shared.crypto import generate_key
from shared.db import create_engine, session_factory
from shared.migrate import upgrade_database
from shared.settings import Settings
from shared.timeutil import new_id, utcnow

PG = "postgresql://postgres@127.0.0.1:5432"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"


async def seed(url: str, tenants: int, servers: int, emails: int) -> list[uuid.UUID]:
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
    await connection.close()
    await queue_emails(url, tenant_ids, emails)
    return tenant_ids


async def queue_emails(url: str, tenant_ids: list[uuid.UUID], emails: int) -> None:
    connection = await asyncpg.connect(url)
    now = utcnow()
    tenants = len(tenant_ids)
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


async def publish_baseline(
    count: int, size: int, concurrency: int, queue_name: str | None = None
) -> float:
    """Seconds for a bare aio-pika loop to publish `count` messages with confirms; into its
    own queue (deleted after), or into `queue_name` (kept, for several publishers at once)."""
    connection = await aio_pika.connect(AMQP)
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(
        queue_name or f"abl-bench-bare-{uuid.uuid4().hex[:6]}",
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
    if queue_name is None:
        await queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    return elapsed


def bare_publisher(queue: str, count: int, size: int) -> None:
    asyncio.run(publish_baseline(count, size, PUBLISH_WINDOW, queue_name=queue))


def bare_publishers_rate(count: int, messages: int, size: int) -> float:
    """Messages per second of `count` bare aio-pika processes publishing into one queue: what
    the broker (and this machine) allow, whatever the scheduler does."""
    queue = f"abl-bench-bare-{uuid.uuid4().hex[:6]}"
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=bare_publisher, args=(queue, messages // count, size))
        for _ in range(count)
    ]
    started = time.perf_counter()
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    rate = messages / (time.perf_counter() - started)
    asyncio.run(delete_queue(queue))
    return rate


async def delete_queue(name: str) -> None:
    connection = await aio_pika.connect(AMQP)
    channel = await connection.channel()
    await channel.queue_delete(name)
    await connection.close()


def settings_for(url: str, prefix: str) -> Settings:
    return Settings(
        admin_token="x" * 32,
        internal_token="y" * 32,
        unsubscribe_key="u" * 32,
        encryption_keys=generate_key(),
        database_url=url,
        pacing=False,
        queue_prefix=prefix,
    )


async def tick_once(url: str, prefix: str) -> tuple[int, float, float, float]:
    """One tick: jobs dispatched, dispatch seconds, publish seconds, and the RSS after it."""
    engine = create_engine(url)
    bus = RabbitBus(AMQP)
    await bus.connect()
    try:
        dispatcher = Dispatcher(settings_for(url, prefix), session_factory(engine), bus)
        report = await dispatcher.tick()
    finally:
        await bus.close()
        await engine.dispose()
    return report.dispatched, report.dispatch_seconds, report.publish_seconds, rss_mib()


def replica(url: str, prefix: str) -> None:
    """A scheduler process: tick until a tick finds nothing left to dispatch."""

    async def run() -> None:
        engine = create_engine(url)
        bus = RabbitBus(AMQP)
        await bus.connect()
        try:
            dispatcher = Dispatcher(settings_for(url, prefix), session_factory(engine), bus)
            while (await dispatcher.tick()).dispatched:
                pass
        finally:
            await bus.close()
            await engine.dispose()

    asyncio.run(run())


def replicas_rate(url: str, prefix: str, count: int, emails: int) -> float:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=replica, args=(url, prefix)) for _ in range(count)]
    started = time.perf_counter()
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    return emails / (time.perf_counter() - started)


async def fresh_database() -> str:
    name = f"abl_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{PG}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = f"{PG}/{name}"
    await asyncio.to_thread(upgrade_database, url)
    return url


async def drop_database(url: str) -> None:
    admin = await asyncpg.connect(f"{PG}/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    await admin.close()


async def delete_queues(prefix: str) -> None:
    connection = await aio_pika.connect(AMQP)
    channel = await connection.channel()
    for queue in (f"{prefix}.send-jobs", f"{prefix}.send-jobs.dead"):
        await channel.queue_delete(queue)
    await connection.close()


async def main(args: argparse.Namespace) -> None:
    if args.full:
        args.tenants, args.servers, args.emails = 1000, 100_000, 1_000_000
    prefix = f"abl-bench-{uuid.uuid4().hex[:6]}"
    url = await fresh_database()
    try:
        started = time.perf_counter()
        tenant_ids = await seed(url, args.tenants, args.servers, args.emails)
        print(
            f"seeded {args.tenants} tenants, {args.servers} servers, {args.emails} emails "
            f"in {time.perf_counter() - started:.1f} s"
        )
        jobs, dispatch_seconds, publish_seconds, _ = await tick_once(url, prefix)
        await delete_queues(prefix)
        bulk = await bulk_update_baseline(url, jobs)
        bare = await publish_baseline(jobs, args.job_bytes, concurrency=PUBLISH_WINDOW)
        publish_rate = jobs / publish_seconds if publish_seconds else 0.0
        bare_rate = jobs / bare
        print(f"tick: dispatched {jobs} jobs in {dispatch_seconds + publish_seconds:.1f} s")
        print(
            f"  reserve + mark (compute allowances, claim, reserve, mark): "
            f"{dispatch_seconds:.2f} s; one bulk UPDATE of {jobs} rows: {bulk:.2f} s; "
            f"ratio {dispatch_seconds / bulk:.1f}x"
        )
        print(
            f"  publish with confirms, window {PUBLISH_WINDOW}: {publish_rate:,.0f} jobs/s; "
            f"bare aio-pika loop: {bare_rate:,.0f} msg/s; ratio {publish_rate / bare_rate:.2f}x"
        )
        if args.rounds:
            points = []
            for _ in range(args.rounds):
                await queue_emails(url, tenant_ids, args.emails // 10)
                points.append((await tick_once(url, prefix))[3])
                await delete_queues(prefix)
            print(
                f"  memory after each of {args.rounds} more ticks: "
                + ", ".join(f"{mib:.0f} MiB" for mib in points)
                + f"; growth first to last {points[-1] - points[0]:+.1f} MiB"
            )
    finally:
        await drop_database(url)
        await delete_queues(prefix)
    if args.replicas:
        rates = []
        for count in (1, args.replicas):
            url = await fresh_database()
            prefix = f"abl-bench-{uuid.uuid4().hex[:6]}"
            try:
                await seed(url, args.tenants, args.servers, args.emails)
                rates.append(
                    await asyncio.to_thread(replicas_rate, url, prefix, count, args.emails)
                )
            finally:
                await drop_database(url)
                await delete_queues(prefix)
        print(
            f"scale-out on PostgreSQL: 1 scheduler {rates[0]:,.0f} emails/s dispatched and "
            f"published, {args.replicas} schedulers {rates[1]:,.0f}; "
            f"ratio {rates[1] / rates[0]:.2f}x"
        )
        # The same scale-out for bare publishers into one queue: the ceiling the broker and
        # the machine put on any number of schedulers.
        ceiling = [
            await asyncio.to_thread(bare_publishers_rate, count, args.emails, args.job_bytes)
            for count in (1, args.replicas)
        ]
        print(
            f"  ceiling: 1 bare aio-pika publisher {ceiling[0]:,.0f} msg/s into one queue, "
            f"{args.replicas} publishers {ceiling[1]:,.0f}; ratio {ceiling[1] / ceiling[0]:.2f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--servers", type=int, default=2000)
    parser.add_argument("--emails", type=int, default=20_000)
    parser.add_argument("--full", action="store_true", help="1,000 tenants, 100k servers, 1M")
    parser.add_argument("--job-bytes", type=int, default=450, help="the bare loop's message size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
