"""Services as real processes (`python -m services.cli serve --service ...`), for tests of
restarts, SIGTERM and kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from shared.settings import SERVICE_SETTINGS, Settings, unused_secrets
from tests.support.smtp import free_port

ROOT = Path(__file__).resolve().parents[2]


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABL_")}
    env.update(
        {
            "ABL_ENV": "test",
            "ABL_DATABASE_URL": settings.database_url,
            "ABL_AMQP_URL": settings.amqp_url.get_secret_value(),
            "ABL_QUEUE_PREFIX": settings.queue_prefix,
            "ABL_ADMIN_TOKEN": settings.admin_token.get_secret_value(),
            "ABL_INTERNAL_TOKEN": settings.internal_token.get_secret_value(),
            "ABL_UNSUBSCRIBE_KEY": settings.unsubscribe_key.get_secret_value(),
            "ABL_ENCRYPTION_KEYS": ",".join(
                key.get_secret_value() for key in settings.encryption_keys
            ),
            "ABL_ALLOW_PRIVATE_HOSTS": "true",
            "ABL_PACING": "off",
            "ABL_LOG_LEVEL": "WARNING",
        }
    )
    env.update(extra)
    return env


@dataclass
class Service:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, number: signal.Signals) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def start(
    name: str,
    service: str,
    env: Mapping[str, str],
    log_dir: Path,
    *,
    ready_timeout: float = 120,
    port: int | None = None,
    args: tuple[str, ...] = (),
    wait_ready: bool = True,
) -> Service:
    """Start a service and wait until /readyz answers 200 (a loaded machine may take a while),
    or with `wait_ready=False` until /healthz does; `port` restarts a service where its clients
    expect it."""
    port = port or free_port()
    log = log_dir / f"{name}.log"
    # Each service gets only the secrets its settings read, as its Kubernetes Secret holds:
    # every process test is also a test that the service starts with no more than that.
    unused = set(unused_secrets(SERVICE_SETTINGS[service], env))
    process = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
        [sys.executable, "-m", "services.cli", "serve", "--service", service, *args],
        cwd=ROOT,
        env={**{k: v for k, v in env.items() if k not in unused}, "ABL_PORT": str(port)},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    running = Service(name, port, process, log)
    probe = "readyz" if wait_ready else "healthz"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{running.url}/{probe}", timeout=1).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    running.stop()
    raise RuntimeError(f"{name} not ready: {log.read_text()[-2000:]}")


async def delete_queues(amqp_url: str, settings: Settings) -> None:
    """Remove a test's queues (and their dead-letter queues) from RabbitMQ."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        # Every one of them: quorum queues left behind by each run add up in a broker that
        # the next runs share, until it slows down for all of them.
        for queue in settings.durable_queues:
            for name in (queue, f"{queue}.dead", f"{queue}.dead.parked"):
                await channel.queue_delete(name)


def new_tenant(client: httpx.Client, admin_token: str, name: str = "acme") -> dict[str, str]:
    """Create a tenant through the API; return the headers that speak for it."""
    response = client.post(
        "/v1/tenants", json={"name": name}, headers={"Authorization": f"Bearer {admin_token}"}
    )
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['api_key']}"}


def add_smtp_servers(
    client: httpx.Client,
    tenant: Mapping[str, str],
    port: int,
    accounts: Mapping[str, str],
    **extra: object,
) -> list[dict[str, object]]:
    """Add one STARTTLS server on localhost:`port` per account; return the servers."""
    servers = []
    for login, password in accounts.items():
        body = {
            "host": "localhost",
            "port": port,
            "security": "starttls",
            "username": login,
            "password": password,
            "from_email": login,
            **extra,
        }
        response = client.post("/v1/servers", headers=dict(tenant), json=body)
        assert response.status_code == 201, response.text
        servers.append(response.json())
    return servers
