"""`make run`'s shape as a real process: every service in one, SQLite, the in-process bus.
Add servers, queue emails, watch them leave through a real SMTP server; restart mid-run."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx

from shared.settings import Settings
from tests.conftest import make_settings
from tests.support.processes import add_smtp_servers, new_tenant, service_env, start
from tests.support.smtp import Certificates, smtp_server

LOGINS = {"a@example.com": "pa", "b@example.com": "pb", "c@example.com": "pc"}


def wait_for(check: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_single_process_sends_and_survives_a_restart(tmp_path: Path, certs: Certificates) -> None:
    settings: Settings = make_settings(f"sqlite:///{tmp_path / 'run.db'}")
    env = service_env(settings, SSL_CERT_FILE=certs.ca_file)
    with smtp_server(certs, LOGINS) as smtp:
        service = start("all", "all", env, tmp_path)
        try:
            client = httpx.Client(base_url=service.url, timeout=30)
            tenant = new_tenant(client, settings.admin_token.get_secret_value())
            add_smtp_servers(client, tenant, smtp.port, LOGINS)
            batch = {
                "messages": [
                    {"to": f"ok+{i}@example.org", "subject": "s", "text": "t"} for i in range(30)
                ]
            }
            assert client.post("/v1/messages", json=batch, headers=tenant).status_code == 202

            def sent() -> int:
                page = client.get(
                    "/v1/messages", params={"status": "sent", "limit": 500}, headers=tenant
                )
                return len(page.json()["items"])

            wait_for(lambda: sent() == 30)
            assert dict(smtp.recorder.accepted) == dict.fromkeys(LOGINS, 10)

            # Queue more, stop the process gracefully mid-run, start it again.
            more = {
                "messages": [
                    {"to": f"ok+m{i}@example.org", "subject": "s", "text": "t"} for i in range(30)
                ]
            }
            client.post("/v1/messages", json=more, headers=tenant)
            service.signal(signal.SIGTERM)
            assert service.wait(timeout=60) == 0
            service = start("all-again", "all", env, tmp_path)
            client = httpx.Client(base_url=service.url, timeout=30)
            wait_for(lambda: sent() == 60)
            assert sum(smtp.recorder.accepted.values()) == 60, "an email was sent twice"
        finally:
            service.stop()
