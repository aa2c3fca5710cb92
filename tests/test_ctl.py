"""ablctl against a running service (one process): tenants, servers, CSV sending, watching,
webhook endpoints and `listen`, and API errors shown as a person reads them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from services.ctl import app
from tests.conftest import make_settings
from tests.support.processes import ROOT, Service, service_env, start
from tests.support.smtp import Certificates, SmtpTestServer, free_port, smtp_server

runner = CliRunner()
ACCOUNTS = {"a@example.com": "pa", "b@example.com": "pb"}


@pytest.fixture(scope="module")
def service(
    certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, str]]:
    logs = tmp_path_factory.mktemp("ctl")
    settings = make_settings(f"sqlite:///{logs / 'abl.db'}")
    running = start("all", "all", service_env(settings, SSL_CERT_FILE=certs.ca_file), logs)
    try:
        yield running, settings.admin_token.get_secret_value()
    finally:
        running.stop()


@pytest.fixture
def smtp(certs: Certificates) -> Iterator[SmtpTestServer]:
    with smtp_server(certs, ACCOUNTS) as server:
        yield server


def add_server_args(smtp: SmtpTestServer, login: str, from_email: str, password: str) -> list[str]:
    return [
        "servers",
        "add",
        "--host",
        "localhost",
        "--port",
        str(smtp.port),
        "--security",
        "starttls",
        "--username",
        login,
        "--from-email",
        from_email,
        "--password",
        password,
    ]


def tenant_env(service: tuple[Service, str], name: str) -> dict[str, str]:
    """`ablctl tenants create NAME`; the environment that speaks for the new tenant."""
    running, admin = service
    env = {"ABL_API_URL": running.url, "ABL_ADMIN_TOKEN": admin}
    created = runner.invoke(app, ["tenants", "create", name], env=env)
    assert created.exit_code == 0, created.output
    match = re.search(r"API key: (abl_\S+)", created.output)
    assert match is not None
    return env | {"ABL_API_KEY": match.group(1)}


def test_ctl_from_tenant_to_sent_emails(
    service: tuple[Service, str], smtp: SmtpTestServer, tmp_path: Path
) -> None:
    env = tenant_env(service, "acme")

    for login, password in ACCOUNTS.items():
        added = runner.invoke(app, add_server_args(smtp, login, login, password), env=env)
        assert added.exit_code == 0, added.output
        assert "active" in added.output

    wrong = runner.invoke(
        app, add_server_args(smtp, "a@example.com", "x@example.com", "wrong"), env=env
    )
    assert wrong.exit_code == 1
    assert "Error (auth_failed)" in wrong.output
    assert "hint" in wrong.output

    listed = runner.invoke(app, ["servers", "list"], env=env)
    assert listed.exit_code == 0
    assert listed.output.count("active") == 2

    leads = tmp_path / "leads.csv"
    leads.write_text(
        "to,subject,text\n" + "".join(f"ok+{i}@example.org,Hello {i},Hi there\n" for i in range(10))
    )
    sent = runner.invoke(app, ["send", str(leads), "--campaign", "nov"], env=env)
    assert sent.exit_code == 0, sent.output
    assert "queued 10" in sent.output

    deadline = time.monotonic() + 30
    while sum(smtp.recorder.accepted.values()) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(0.5)
    watched = runner.invoke(app, ["watch", "--once", "--campaign", "nov"], env=env)
    assert re.search(r"sent\s*│\s*10", watched.output), watched.output

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("to,subject,text\nnot-an-address,Hello,Hi\n")
    refused = runner.invoke(app, ["send", str(bad_csv)], env=env)
    assert refused.exit_code == 1
    assert "body.messages.0.to" in refused.output


def test_ctl_imports_a_suppression_csv_and_send_reports_the_refused(
    service: tuple[Service, str], tmp_path: Path
) -> None:
    env = tenant_env(service, "suppressing")

    listed_csv = tmp_path / "suppress.csv"
    listed_csv.write_text(
        "address,domain,reason\ngone@example.org,,hard bounce\n,blocked.example,asked\n"
    )
    imported = runner.invoke(app, ["suppressions", "import", str(listed_csv)], env=env)
    assert imported.exit_code == 0, imported.output
    assert "suppressed 2 new, already on the list 0" in imported.output
    bare = tmp_path / "bare.csv"
    bare.write_text("gone@example.org\nother@example.org\n")
    again = runner.invoke(app, ["suppressions", "import", str(bare)], env=env)
    assert "suppressed 1 new, already on the list 1" in again.output, again.output
    listed = runner.invoke(app, ["suppressions", "list"], env=env)
    assert "3 entries" in listed.output, listed.output

    leads = tmp_path / "leads.csv"
    leads.write_text(
        "to,subject,text\ngone@example.org,Hi,x\nx@blocked.example,Hi,x\nnew@example.org,Hi,x\n"
    )
    sent = runner.invoke(app, ["send", str(leads)], env=env)
    assert "queued 1, already known 0, suppressed 2" in sent.output, sent.output

    bad = tmp_path / "bad.csv"
    bad.write_text("address\nnot-an-address\n")
    refused = runner.invoke(app, ["suppressions", "import", str(bad)], env=env)
    assert refused.exit_code == 1
    assert "body.items.0.address" in refused.output


def _listener(port: int, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """`ablctl listen` as a developer runs it, in its own process."""
    return subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
        [sys.executable, "-m", "services.ctl", "listen", "--port", str(port), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _forged(url: str) -> int:
    """Post an event signed with a wrong key until the listener answers; its status code."""
    headers = {
        "webhook-id": "evt_" + "0" * 32,
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": "v1,ZmFrZQ==",
    }
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.post(url, content=b'{"type":"email.sent"}', headers=headers).status_code
        except httpx.ConnectError:
            assert time.monotonic() < deadline, "the listener did not start"
            time.sleep(0.1)


def _send(env: dict[str, str], tmp_path: Path, count: int, tag: str) -> None:
    leads = tmp_path / f"{tag}.csv"
    leads.write_text(
        "to,subject,text\n" + "".join(f"{tag}+{i}@example.org,Hi {i},x\n" for i in range(count))
    )
    sent = runner.invoke(app, ["send", str(leads)], env=env)
    assert f"queued {count}" in sent.output, sent.output


def test_ctl_webhooks_and_listen_print_each_verified_event(
    service: tuple[Service, str], smtp: SmtpTestServer, tmp_path: Path
) -> None:
    env = tenant_env(service, "hooked")
    for login, password in ACCOUNTS.items():
        added = runner.invoke(app, add_server_args(smtp, login, login, password), env=env)
        assert added.exit_code == 0, added.output

    port = free_port()
    added = runner.invoke(
        app, ["webhooks", "add", f"http://127.0.0.1:{port}/", "--event", "email.sent"], env=env
    )
    assert added.exit_code == 0, added.output
    secret = re.search(r"signing secret: (whsec_\S+)", added.output)
    endpoint = re.search(r"added (\S+) \(email\.sent\)", added.output)
    assert secret is not None, added.output
    assert endpoint is not None, added.output
    listener = _listener(port, {"ABL_WEBHOOK_SECRET": secret.group(1)}, "--count", "5")
    try:
        assert _forged(f"http://127.0.0.1:{port}/") == 401
        _send(env, tmp_path, 5, "hooked")
        out, err = listener.communicate(timeout=60)
    finally:
        listener.kill()
    assert listener.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 5, out
    assert {e["type"] for e in events} == {"email.sent"}
    assert len({e["webhook-id"] for e in events}) == 5
    assert {e["data"]["status"] for e in events} == {"sent"}
    assert "refused a request with a bad signature" in err

    listed = runner.invoke(app, ["webhooks", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert endpoint.group(1)[:8] in listed.output
    deadline = time.monotonic() + 30
    while True:  # the outcome is recorded just after the listener answered
        log = runner.invoke(app, ["webhooks", "deliveries", endpoint.group(1)], env=env)
        if log.output.count("delivered") == 5:
            break
        assert time.monotonic() < deadline, log.output
        time.sleep(0.2)
    assert "5 deliveries" in log.output
    rotated = runner.invoke(app, ["webhooks", "rotate-secret", endpoint.group(1)], env=env)
    assert rotated.exit_code == 0, rotated.output
    assert "new signing secret: whsec_" in rotated.output
    assert secret.group(1) not in rotated.output
    missing = runner.invoke(app, ["webhooks", "deliveries", str(uuid.uuid4())], env=env)
    assert missing.exit_code == 1
    assert "Error (webhook_not_found)" in missing.output

    # --register: the listener registers itself, prints what it receives, and unregisters.
    second = free_port()
    listener = _listener(second, env, "--register", "--event", "email.sent", "--count", "2")
    try:
        assert _forged(f"http://127.0.0.1:{second}/") == 401
        _send(env, tmp_path, 2, "again")
        out, err = listener.communicate(timeout=60)
    finally:
        listener.kill()
    assert listener.returncode == 0, err
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["email.sent"] * 2
    remaining = runner.invoke(app, ["webhooks", "list"], env=env)
    assert str(second) not in remaining.output
