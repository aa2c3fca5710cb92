"""`make demo`: the whole product on this machine in a minute.

Starts a local SMTP server (STARTTLS and AUTH, three accounts, its own test certificate) and the
service in one process, creates a tenant, adds three servers, sends 30 emails, and shows that
each server sent 10, with each server's warmup.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import httpx
import trustme
from rich.console import Console
from rich.table import Table

from shared.crypto import generate_key
from shared.settings import Settings
from tests.support.processes import add_smtp_servers, service_env, start
from tests.support.smtp import Certificates, smtp_server

ACCOUNTS = {
    "sales1@demo.example.com": "app-password-1",
    "sales2@demo.example.com": "app-password-2",
    "sales3@demo.example.com": "app-password-3",
}
console = Console()


def main() -> None:
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="abl-demo-"))
    ca = trustme.CA()
    ca_file = workdir / "demo-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    settings = Settings(
        admin_token="demo-admin-" + "x" * 24,
        internal_token="demo-internal-" + "y" * 24,
        unsubscribe_key="demo-unsubscribe-" + "u" * 24,
        encryption_keys=generate_key(),
        database_url=f"sqlite:///{workdir / 'demo.db'}",
    )
    env = service_env(settings, SSL_CERT_FILE=str(ca_file), ABL_LOG_LEVEL="WARNING")
    with smtp_server(Certificates(ca, str(ca_file)), ACCOUNTS) as smtp:
        console.print(
            f"SMTP server with STARTTLS and AUTH on localhost:{smtp.port}, "
            f"3 accounts, certificate from a demo CA"
        )
        service = start("demo", "all", env, workdir)
        console.print(f"service (all in one process) on {service.url}, data in {workdir}")
        try:
            api = httpx.Client(base_url=service.url, timeout=30)
            admin = {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}
            tenant = api.post("/v1/tenants", json={"name": "Demo Co"}, headers=admin).json()
            headers = {"Authorization": f"Bearer {tenant['api_key']}"}
            console.print(f"tenant [bold]{tenant['name']}[/] created")
            servers = add_smtp_servers(api, headers, smtp.port, ACCOUNTS, from_name="Demo Sales")
            labels = {}
            for n, (server, login) in enumerate(zip(servers, ACCOUNTS, strict=True), 1):
                api.patch(
                    f"/v1/servers/{server['id']}", headers=headers, json={"label": f"Sales {n}"}
                )
                labels[str(server["id"])] = (f"Sales {n}", login)
                console.print(
                    f"server [bold]Sales {n}[/]: connected, TLS verified, "
                    f"authenticated → {server['status']}"
                )
            batch = {
                "messages": [
                    {
                        "to": f"lead{i}@prospects.example.org",
                        "subject": f"Hello lead {i}",
                        "text": "Nice to meet you.",
                    }
                    for i in range(30)
                ]
            }
            api.post("/v1/messages", json=batch, headers=headers)
            console.print("30 emails queued; waiting for them to leave…")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                page = api.get(
                    "/v1/messages", params={"status": "sent", "limit": 100}, headers=headers
                ).json()
                if len(page["items"]) == 30:
                    break
                time.sleep(0.3)
            table = Table(
                "server",
                "account",
                "accepted",
                "step",
                "allowance",
                "sent today",
                "left today",
                title="What the SMTP server received; each warmup",
            )
            for server_id, (label, login) in labels.items():
                warmup = api.get(f"/v1/servers/{server_id}/warmup", headers=headers).json()
                table.add_row(
                    label,
                    login,
                    str(smtp.recorder.accepted[login]),
                    str(warmup["step"]),
                    str(warmup["allowance_today"]),
                    str(warmup["sent_today"]),
                    str(warmup["remaining_today"]),
                )
            console.print(table)
            total = sum(smtp.recorder.accepted.values())
            console.print(
                f"[bold green]{total} of 30 emails delivered[/], 10 through each server."
                if total == 30
                else f"[red]{total} of 30 delivered[/]"
            )
        finally:
            service.stop()


if __name__ == "__main__":
    main()
