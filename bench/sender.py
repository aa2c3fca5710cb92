"""Sender throughput and memory, each figure beside its baseline from the same run.

Against a local aiosmtpd sink in its own process (STARTTLS, AUTH, every reply delayed by
`--delay`, 50 ms by default):

1. one worker delivering to 1,000 distinct servers (a new connection per email), against a
   bare aiosmtplib loop (connect, STARTTLS, AUTH, send, QUIT) at the same concurrency;
2. one worker with pooled connections to a few servers, against the same bare loop;
3. the worker of (1) against a naive sequential smtplib loop, a new connection per email;
4. memory over many jobs (`--memory-jobs`, 100,000 by default) with no reply delay.

The worker runs as in production (the in-process bus, parsing, message building, result
events), except that the registry and scheduler look-ups are answered from memory.

    .venv/bin/python -m bench.sender
"""

from __future__ import annotations

import argparse
import asyncio
import os
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import aiosmtplib
import trustme

from services.sender.clients import BatchedJobStates, CachedCredentials, JobKey
from services.sender.delivery import Deliverer
from services.sender.worker import Worker
from shared.broker import Delivery, InProcessBus
from shared.crypto import generate_key
from shared.messages import EmailContent, SendJob, SendResult, SmtpCredentials
from shared.settings import Settings
from tests.support.smtp import free_port

HOST = "127.0.0.1"


def memory_registry(known: dict[uuid.UUID, SmtpCredentials]) -> CachedCredentials:
    async def fetch(server_id: uuid.UUID) -> SmtpCredentials | None:
        return known[server_id]

    async def report(server_id: uuid.UUID, reply: str) -> None:
        return None

    return CachedCredentials(fetch, report, ttl_seconds=60)


class AlwaysSendable:
    async def sendable(self, jobs: Iterable[JobKey]) -> set[uuid.UUID]:
        return {job_id for _, job_id in jobs}

    async def report(self, result: SendResult) -> None:
        raise AssertionError("the in-process bus is never away")


def credentials_for(server_id: uuid.UUID, port: int) -> SmtpCredentials:
    return SmtpCredentials(
        id=server_id,
        tenant_id=server_id,
        host=HOST,
        port=port,
        security="starttls",
        username=f"user-{server_id.hex[:8]}",
        password="pw",
        from_email="bench@example.com",
        from_name="Bench",
        status="active",
        daily_cap=500,
    )


def job_for(server_id: uuid.UUID, index: int) -> bytes:
    return (
        SendJob(
            job_id=uuid.uuid4(),
            email_id=uuid.uuid4(),
            tenant_id=server_id,
            server_id=server_id,
            attempt=1,
            reserved_day="2026-11-26",
            content=EmailContent(
                to=f"lead{index}@example.org",
                subject=f"Hello {index}",
                text="A short benchmark email.\n",
                message_id=f"abl.{index}",
            ),
        )
        .model_dump_json()
        .encode()
    )


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_worker(
    settings: Settings, port: int, servers: list[uuid.UUID], jobs: int, checkpoints: int = 0
) -> tuple[float, list[tuple[int, float]]]:
    bus = InProcessBus()
    deliverer = Deliverer(settings)
    registry = memory_registry({s: credentials_for(s, port) for s in servers})
    worker = Worker(settings, bus, registry, BatchedJobStates(AlwaysSendable()), deliverer)
    done = asyncio.Event()
    finished = 0
    memory: list[tuple[int, float]] = []

    async def count(_: Delivery) -> None:
        nonlocal finished
        finished += 1
        if checkpoints and finished % checkpoints == 0:
            memory.append((finished, rss_mib()))
        if finished == jobs:
            done.set()

    await bus.consume(settings.results_queue, count, prefetch=1000)
    started = time.perf_counter()
    await worker.start()
    for index in range(jobs):
        # Fed in steps so that 100,000 jobs are never all in memory at once.
        while index - finished > 5 * settings.sender_prefetch:
            await asyncio.sleep(0.001)
        await bus.publish(
            settings.send_jobs_queue,
            job_for(servers[index % len(servers)], index),
            message_id=str(index),
        )
    await done.wait()
    elapsed = time.perf_counter() - started
    await worker.drain(5)
    await deliverer.close()
    await bus.close()
    return jobs / elapsed, memory


async def run_bare(port: int, jobs: int, concurrency: int, context: ssl.SSLContext) -> float:
    slots = asyncio.Semaphore(concurrency)
    message = b"From: bench@example.com\r\nTo: lead@example.org\r\nSubject: Hello\r\n\r\nHi\r\n"

    async def one(index: int) -> None:
        async with slots:
            client = aiosmtplib.SMTP(hostname=HOST, port=port, start_tls=True, tls_context=context)
            await client.connect()
            await client.login(f"user-{index}", "pw")
            await client.sendmail("bench@example.com", [f"lead{index}@example.org"], message)
            await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    return jobs / (time.perf_counter() - started)


def run_naive(port: int, jobs: int, context: ssl.SSLContext) -> float:
    message = "From: bench@example.com\r\nTo: lead@example.org\r\nSubject: Hello\r\n\r\nHi\r\n"
    started = time.perf_counter()
    for index in range(jobs):
        with smtplib.SMTP(HOST, port, timeout=30) as client:
            client.starttls(context=context)
            client.login(f"user-{index}", "pw")
            client.sendmail("bench@example.com", [f"lead{index}@example.org"], message)
    return jobs / (time.perf_counter() - started)


def start_sink(port: int, delay: float, cert: str, key: str) -> subprocess.Popen[bytes]:
    sink = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
        [
            sys.executable,
            "-m",
            "bench.smtp_sink",
            "--port",
            str(port),
            "--delay",
            str(delay),
            "--cert",
            cert,
            "--key",
            key,
        ],
        stdout=subprocess.PIPE,
    )
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == b"ready"
    return sink


async def main(args: argparse.Namespace) -> None:
    ca = trustme.CA()
    workdir = Path(tempfile.mkdtemp())
    ca_file, cert_file, key_file = (str(workdir / n) for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(ca_file)
    leaf = ca.issue_cert(HOST, "localhost")
    leaf.private_key_pem.write_to_path(key_file)
    with open(cert_file, "wb") as handle:
        for blob in leaf.cert_chain_pems:
            handle.write(blob.bytes())
    os.environ["SSL_CERT_FILE"] = ca_file
    context = ssl.create_default_context(cafile=ca_file)

    def settings(prefetch: int) -> Settings:
        return Settings(
            admin_token="x" * 32,
            internal_token="y" * 32,
            unsubscribe_key="u" * 32,
            encryption_keys=generate_key(),
            allow_private_hosts=True,
            sender_prefetch=prefetch,
            sender_connections_per_server=2,
            sender_data_timeout_seconds=60,
        )

    port = free_port()
    sink = start_sink(port, args.delay, cert_file, key_file)
    try:
        c = args.concurrency
        distinct = [uuid.uuid4() for _ in range(args.jobs)]
        print(
            f"sink: STARTTLS + AUTH, {args.delay * 1000:.0f} ms before each reply; "
            f"{args.jobs} emails, concurrency {c}"
        )
        bare = await run_bare(port, args.jobs, c, context)
        worker_distinct, _ = await run_worker(settings(c), port, distinct, args.jobs)
        print(
            f"1. worker, {args.jobs} distinct servers: {worker_distinct:8.1f} emails/s  "
            f"bare aiosmtplib loop: {bare:8.1f} emails/s  ratio {worker_distinct / bare:.2f}x"
        )
        few = [uuid.uuid4() for _ in range(args.few_servers)]
        pooled_c = args.few_servers * 2
        bare_pooled_c = await run_bare(port, args.jobs, pooled_c, context)
        worker_pooled, _ = await run_worker(settings(pooled_c), port, few, args.jobs)
        print(
            f"2. worker, pooled to {args.few_servers} servers (concurrency {pooled_c}): "
            f"{worker_pooled:8.1f} emails/s  bare loop at {pooled_c}: {bare_pooled_c:8.1f} "
            f"emails/s  ratio {worker_pooled / bare_pooled_c:.2f}x"
        )
        naive = run_naive(port, args.naive_jobs, context)
        print(
            f"3. naive smtplib loop, new connection per email: {naive:8.1f} emails/s  "
            f"worker (1) ratio {worker_distinct / naive:.1f}x"
        )
    finally:
        sink.terminate()
        sink.wait()
    if args.memory_jobs:
        port = free_port()
        sink = start_sink(port, 0.0, cert_file, key_file)
        try:
            servers = [uuid.uuid4() for _ in range(50)]
            rate, memory = await run_worker(
                settings(100), port, servers, args.memory_jobs, checkpoints=args.memory_jobs // 10
            )
            points = ", ".join(f"{n // 1000}k: {mib:.0f} MiB" for n, mib in memory)
            print(f"4. memory over {args.memory_jobs} jobs at {rate:.0f} emails/s: {points}")
            first, last = memory[0][1], memory[-1][1]
            print(f"   growth from the first to the last checkpoint: {last - first:+.1f} MiB")
        finally:
            sink.terminate()
            sink.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--few-servers", type=int, default=4)
    parser.add_argument("--naive-jobs", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--memory-jobs", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
