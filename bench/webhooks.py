"""Webhook delivery throughput: events delivered per second to a local receiver by the webhooks
service, against a bare httpx loop posting the same signed payloads to the same receiver, and
the CPU seconds each spends per 1,000 events.

    python -m bench.webhooks [--events 3000] [--rounds 2] [--sqlite]

The service side is the production code path of one process: events published to the events
queue (in-process bus), consumed by `Intake` (each stored once, with one delivery row per
endpoint, in its own transaction), claimed by `Deliverer` in batches, signed (Standard
Webhooks) and posted at its concurrency (`ABL_WEBHOOK_CONCURRENCY`, 32), each outcome recorded.
The database is a fresh PostgreSQL database (or SQLite with `--sqlite`); its server's CPU is
not in the figure. The baseline signs each payload with the same library and posts it with one
`httpx.AsyncClient` at the same concurrency, and records nothing. The receiver is a separate
uvicorn process that verifies every signature and counts distinct `webhook-id`s; both sides
must deliver every event with a valid signature. Rounds alternate, so both see the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from bench.proc import own_cpu_seconds
from bench.scheduler_tick import drop_database, fresh_database
from services.webhooks import delivery
from services.webhooks.api import new_secret
from services.webhooks.main import webhooks_resources
from services.webhooks.models import WebhookEndpoint
from shared.app import build_app, database
from shared.bus_resource import in_process_bus
from shared.crypto import generate_key
from shared.events import Event, EventType
from shared.migrate import upgrade_database
from shared.settings import WebhookSettings
from tests.support.smtp import free_port

CONCURRENCY = 32

# --- the receiver (a separate process) -------------------------------------------------------

_state: dict[str, Any] = {"secret": None, "ids": set(), "requests": 0, "bad": 0}

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def sink(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """ASGI app: POST / verifies and counts; POST /reset?secret sets the key; GET /count."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    status, answer = 204, b""
    if scope["path"] == "/reset":
        _state.update(secret=Webhook(body.decode()), ids=set(), requests=0, bad=0)
    elif scope["path"] == "/count":
        counts = {"ids": len(_state["ids"]), "requests": _state["requests"], "bad": _state["bad"]}
        answer = json.dumps(counts).encode()
        status = 200
    else:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        _state["requests"] += 1
        try:
            _state["secret"].verify(body, headers)
            _state["ids"].add(headers["webhook-id"])
        except Exception:
            _state["bad"] += 1
            status = 401
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(answer)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": answer})


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.webhooks:sink",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
            ]
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        with httpx.Client() as client:
            while True:
                try:
                    client.get(f"{self.url}/count")
                    return
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "the receiver did not start"
                    time.sleep(0.1)

    async def reset(self, client: httpx.AsyncClient, secret: str) -> None:
        await client.post(f"{self.url}/reset", content=secret)

    async def count(self, client: httpx.AsyncClient) -> dict[str, int]:
        counted: dict[str, int] = (await client.get(f"{self.url}/count")).json()
        return counted

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


# --- the two sides ---------------------------------------------------------------------------


def events(count: int, tenant_id: uuid.UUID) -> list[Event]:
    return [
        Event(
            type=EventType.email_sent,
            tenant_id=tenant_id,
            data={
                "email_id": str(uuid.uuid4()),
                "status": "sent",
                "server_id": str(uuid.uuid4()),
                "campaign": "bench",
                "attempts": 0,
                "smtp_code": 250,
                "smtp_reply": "2.0.0 Ok: queued as 4ABCDEF",
            },
        )
        for _ in range(count)
    ]


async def bare_loop(receiver: Receiver, secret: str, batch: list[Event]) -> tuple[float, float]:
    """(seconds, CPU seconds) to sign and post every payload once."""
    signer = Webhook(secret)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    slots = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        await receiver.reset(client, secret)
        cpu, started = own_cpu_seconds(os.getpid()), time.perf_counter()

        async def post(event: Event) -> None:
            payload = event.payload()
            now = datetime.now(UTC)
            signature = signer.sign(event.id, now, payload.decode())
            async with slots:
                response = await client.post(
                    f"{receiver.url}/hooks",
                    content=payload,
                    headers={
                        "content-type": "application/json",
                        "webhook-id": event.id,
                        "webhook-timestamp": str(int(now.timestamp())),
                        "webhook-signature": signature,
                    },
                )
            response.raise_for_status()

        await asyncio.gather(*(post(e) for e in batch))
        seconds, cpu = time.perf_counter() - started, own_cpu_seconds(os.getpid()) - cpu
        counted = await receiver.count(client)
    assert counted == {"ids": len(batch), "requests": len(batch), "bad": 0}, counted
    return seconds, cpu


async def service_run(
    receiver: Receiver, database_url: str, batch: list[Event], tenant_id: uuid.UUID
) -> tuple[float, float]:
    """(seconds, CPU seconds) from the first event published to the last one received."""
    settings = WebhookSettings(
        env="test",
        database_url=database_url,
        encryption_keys=generate_key(),
        allow_private_hosts=True,
        webhook_concurrency=CONCURRENCY,
        webhook_tick_seconds=0.05,
    )
    app = build_app(
        title="bench",
        service="webhooks",
        settings=settings,
        resources=[database(settings), in_process_bus(), webhooks_resources(settings)],
    )
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        secret = new_secret()
        endpoint = WebhookEndpoint(
            tenant_id=tenant_id,
            url=f"{receiver.url}/hooks",
            event_types=[EventType.email_sent.value],
            secret_ciphertext="",
        )
        endpoint.secret_ciphertext = app.state.keyring.encrypt(
            secret, delivery.secret_aad(tenant_id, endpoint.id)
        )
        async with app.state.sessions() as session, session.begin():
            session.add(endpoint)
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
        await receiver.reset(client, secret)
        bus = app.state.bus
        cpu, started = own_cpu_seconds(os.getpid()), time.perf_counter()
        for event in batch:
            await bus.publish(settings.events_queue, event.encode(), message_id=event.id)
        while (counted := await receiver.count(client))["ids"] < len(batch):
            await asyncio.sleep(0.02)
        seconds, cpu = time.perf_counter() - started, own_cpu_seconds(os.getpid()) - cpu
    assert counted["bad"] == 0, counted
    return seconds, cpu


async def fresh_sqlite() -> str:
    url = f"sqlite:///{tempfile.mkdtemp(prefix='abl-bench-webhooks-')}/abl.db"
    await asyncio.to_thread(upgrade_database, url)
    return url


async def main(args: argparse.Namespace) -> None:
    receiver = Receiver()
    try:
        bare: list[tuple[float, float]] = []
        served: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            tenant_id = uuid.uuid4()
            bare.append(await bare_loop(receiver, new_secret(), events(args.events, tenant_id)))
            url = await (fresh_sqlite() if args.sqlite else fresh_database())
            try:
                served.append(
                    await service_run(receiver, url, events(args.events, tenant_id), tenant_id)
                )
            finally:
                if not args.sqlite:
                    await drop_database(url)
    finally:
        receiver.stop()
    n = args.events
    bare_rate = max(n / s for s, _ in bare)
    service_rate = max(n / s for s, _ in served)
    bare_cpu = min(c for _, c in bare) / n * 1000
    service_cpu = min(c for _, c in served) / n * 1000
    kind = "SQLite" if args.sqlite else "PostgreSQL"
    print(f"events: {n}; concurrency {CONCURRENCY}; best of {args.rounds} rounds each")
    print(f"bare httpx loop (sign + post): {bare_rate:,.0f} events/s, CPU {bare_cpu:.2f} s/1,000")
    print(
        f"webhooks service ({kind}, in-process bus: intake, store, claim, sign, post, record): "
        f"{service_rate:,.0f} events/s, CPU {service_cpu:.2f} s/1,000"
    )
    print(
        f"ratio service / bare: {service_rate / bare_rate:.2f}x throughput; "
        f"CPU {service_cpu / bare_cpu:.1f}x bare"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sqlite", action="store_true")
    asyncio.run(main(parser.parse_args()))
