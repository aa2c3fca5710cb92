"""`ablctl servers connect` against a running service (one process) and the test authorization
server: it prints the authorize URL, then either sees the browser complete the connection or
takes the URL the browser ended on, pasted on its standard input."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import make_settings
from tests.support.oauth import AuthorizationServer, XOAuth2Recorder, authorization_server
from tests.support.processes import ROOT, Service, new_tenant, service_env, start
from tests.support.smtp import Certificates, SmtpTestServer, free_port, smtp_server


@dataclass
class Running:
    service: Service
    authority: AuthorizationServer
    smtp: SmtpTestServer
    key: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def running(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    logs = tmp_path_factory.mktemp("ctl-connect")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with authorization_server(certs, logs, f"{base}/v1/oauth/callback") as authority:
        recorder = XOAuth2Recorder(authority)
        with smtp_server(certs, {}, recorder=recorder, exclude_auth=("LOGIN", "PLAIN")) as smtp:
            settings = make_settings(f"sqlite:///{logs / 'abl.db'}")
            extra = {
                f"ABL_{name.upper()}": str(value)
                for name, value in authority.provider_settings("google", smtp.port).items()
            }
            env = service_env(
                settings, SSL_CERT_FILE=certs.ca_file, ABL_OAUTH_REDIRECT_BASE_URL=base, **extra
            )
            service = start("all", "all", env, logs, port=port)
            try:
                client = httpx.Client(base_url=service.url, timeout=30)
                tenant = new_tenant(client, settings.admin_token.get_secret_value())
                key = tenant["Authorization"].removeprefix("Bearer ")
                ctl_env = {
                    **os.environ,
                    "ABL_API_URL": service.url,
                    "ABL_API_KEY": key,
                    "SSL_CERT_FILE": certs.ca_file,
                }
                yield Running(service, authority, smtp, key, ctl_env)
            finally:
                service.stop()


def ablctl(running: Running, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603  # the test's own arguments
        [sys.executable, "-m", "services.ctl", *args],
        cwd=ROOT,
        env=running.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def authorize_url_from(process: subprocess.Popen[str], running: Running) -> str:
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(running.authority.base_url):
            return line.strip()
    raise AssertionError("ablctl printed no authorize URL")


def browser_at_provider(running: Running, authorize_url: str, user: str) -> str:
    running.authority.next_user = user
    response = httpx.get(authorize_url)
    assert response.status_code == 302, response.text
    location: str = response.headers["location"]
    return location


def test_connect_waits_for_the_browser(running: Running) -> None:
    process = ablctl(running, "servers", "connect", "google", "--label", "Sales")
    try:
        url = authorize_url_from(process, running)
        callback = browser_at_provider(running, url, "c1@example.com")
        # The browser follows the redirect to the API's callback itself.
        landed = httpx.get(callback, follow_redirects=True)
        assert landed.text.startswith("Connected: server ")
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "connected Sales" in output
    assert "(active)" in output


def test_connect_takes_the_pasted_callback_url(running: Running) -> None:
    process = ablctl(running, "servers", "connect", "google")
    try:
        url = authorize_url_from(process, running)
        callback = browser_at_provider(running, url, "c2@example.com")
        # The browser could not reach the API: the operator pastes where it ended.
        output, _ = process.communicate(input=callback + "\n", timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "connected c2@example.com" in output
    assert running.smtp.recorder.logins["c2@example.com"] == 1


def test_connect_reports_a_declined_consent(running: Running) -> None:
    process = ablctl(running, "servers", "connect", "google")
    try:
        url = authorize_url_from(process, running)
        running.authority.decline_next = True
        callback = browser_at_provider(running, url, "c3@example.com")
        output, _ = process.communicate(input=callback + "\n", timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1, output
    assert "access_denied" in output


def test_connect_with_an_unconfigured_provider_explains(running: Running) -> None:
    process = ablctl(running, "servers", "connect", "microsoft")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "oauth_provider_not_configured" in output
    assert "ABL_OAUTH_" in output
