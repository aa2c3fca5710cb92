"""The pipeline a Python team would write in an afternoon, as the baseline the product must beat:
a Celery worker pool (prefork, concurrency 8) on the same RabbitMQ, each task opening its own
smtplib connection (STARTTLS, AUTH, one email, QUIT).

The bench imports `run` and starts the worker as its own process group; the worker imports this
module for its task. Settings come from the environment, as Celery's own workers take them:
BENCH_AMQP_URL, BENCH_QUEUE, BENCH_SMTP_PORT, BENCH_CA_FILE.
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery

from bench.proc import cpu_seconds

HOST = "127.0.0.1"

app = Celery(
    "abl-bench",
    broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend="rpc://",
)
app.conf.update(
    task_default_queue=os.environ.get("BENCH_QUEUE", "abl-bench-celery"),
    task_acks_late=True,  # as a careful team would: a crashed worker's email is redone
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

MESSAGE = "From: bench@example.com\r\nTo: {to}\r\nSubject: Hi\r\n\r\nHello\r\n"


@app.task(name="send_email")  # type: ignore[untyped-decorator]
def send_email(index: int) -> int:
    context = ssl.create_default_context(cafile=os.environ["BENCH_CA_FILE"])
    port = int(os.environ["BENCH_SMTP_PORT"])
    to = f"lead{index}@example.org"
    with smtplib.SMTP(HOST, port, timeout=30) as client:
        client.starttls(context=context)
        client.login(f"user{index % 3}", "pw")
        client.sendmail("bench@example.com", [to], MESSAGE.format(to=to))
    return index


def run(
    emails: int, amqp_url: str, smtp_port: int, ca_file: str, workdir: Path
) -> tuple[float, float]:
    """Emails per second through a fresh Celery worker, and its CPU seconds (all processes)."""
    queue = f"abl-bench-celery-{os.getpid()}"
    env = {
        **os.environ,
        "BENCH_AMQP_URL": amqp_url,
        "BENCH_QUEUE": queue,
        "BENCH_SMTP_PORT": str(smtp_port),
        "BENCH_CA_FILE": ca_file,
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("BENCH_")})
    app.conf.task_default_queue = queue
    app.conf.broker_url = amqp_url
    log = (workdir / "celery.log").open("wb")
    worker = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_baseline",
            "worker",
            "--concurrency",
            "8",
            "--pool",
            "prefork",
            "--loglevel",
            "WARNING",
            "-Q",
            queue,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Warm: the pool is up and each child has imported everything before the clock starts.
        warmup: Any = [send_email.delay(-1 - i) for i in range(16)]
        for result in warmup:
            result.get(timeout=120)
        cpu_before = cpu_seconds(worker.pid)
        started = time.perf_counter()
        results = [send_email.delay(i) for i in range(emails)]
        for result in results:
            result.get(timeout=300)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(worker.pid) - cpu_before
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue)
    return emails / elapsed, cpu
