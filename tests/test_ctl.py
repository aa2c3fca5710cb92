"""ablctl against a running service (one process): tenants, servers, CSV sending, watching,
and API errors shown as a person reads them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.ctl import app
from tests.conftest import make_settings
from tests.support.processes import Service, service_env, start
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server

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


def test_ctl_from_tenant_to_sent_emails(
    service: tuple[Service, str], smtp: SmtpTestServer, tmp_path: Path
) -> None:
    running, admin = service
    env = {"ABL_API_URL": running.url, "ABL_ADMIN_TOKEN": admin}
    created = runner.invoke(app, ["tenants", "create", "acme"], env=env)
    assert created.exit_code == 0, created.output
    match = re.search(r"API key: (abl_\S+)", created.output)
    assert match is not None
    env["ABL_API_KEY"] = match.group(1)

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
    running, admin = service
    env = {"ABL_API_URL": running.url, "ABL_ADMIN_TOKEN": admin}
    created = runner.invoke(app, ["tenants", "create", "suppressing"], env=env)
    match = re.search(r"API key: (abl_\S+)", created.output)
    assert match is not None
    env["ABL_API_KEY"] = match.group(1)

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
