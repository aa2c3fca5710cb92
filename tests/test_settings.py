"""Least privilege in the settings: each service reads only what it needs, and says so when it
is given a secret it does not use."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shared.crypto import generate_key
from shared.settings import (
    SECRET_SETTINGS,
    SERVICE_SETTINGS,
    GatewaySettings,
    RegistrySettings,
    SchedulerSettings,
    SenderSettings,
    Settings,
    unused_secrets,
    warn_unused_secrets,
)
from tests.support.processes import ROOT
from tests.support.smtp import free_port

ALL_SECRETS = {
    "ABL_DATABASE_URL": "postgresql://abl:pw@db/abl",
    "ABL_AMQP_URL": "amqp://abl:pw@mq/",
    "ABL_ADMIN_TOKEN": "a" * 32,
    "ABL_INTERNAL_TOKEN": "i" * 32,
    "ABL_ENCRYPTION_KEYS": generate_key(),
    "ABL_UNSUBSCRIBE_KEY": "u" * 32,
    "ABL_UNSUBSCRIBE_OLD_KEYS": "o" * 32,
    "ABL_OAUTH_GOOGLE_CLIENT_SECRET": "google-client-secret",
    "ABL_OAUTH_MICROSOFT_CLIENT_SECRET": "microsoft-client-secret",
}
# An OAuth client secret is only valid with its client id and the redirect base URL.
OAUTH_COMPANIONS = {
    "ABL_OAUTH_GOOGLE_CLIENT_ID": "google-client-id",
    "ABL_OAUTH_MICROSOFT_CLIENT_ID": "microsoft-client-id",
    "ABL_OAUTH_REDIRECT_BASE_URL": "https://api.example.com",
}
READS = {
    "registry": {
        "ABL_DATABASE_URL",
        "ABL_AMQP_URL",  # its outbox publishes server events
        "ABL_ADMIN_TOKEN",
        "ABL_INTERNAL_TOKEN",
        "ABL_ENCRYPTION_KEYS",
        "ABL_OAUTH_GOOGLE_CLIENT_SECRET",
        "ABL_OAUTH_MICROSOFT_CLIENT_SECRET",
    },
    "scheduler": {
        "ABL_DATABASE_URL",
        "ABL_AMQP_URL",
        "ABL_INTERNAL_TOKEN",
        "ABL_UNSUBSCRIBE_KEY",
        "ABL_UNSUBSCRIBE_OLD_KEYS",
    },
    "sender": {"ABL_AMQP_URL", "ABL_INTERNAL_TOKEN"},
    # The internal token: its copy of the tenants reads the registry's snapshot routes.
    "webhooks": {
        "ABL_DATABASE_URL",
        "ABL_AMQP_URL",
        "ABL_ENCRYPTION_KEYS",
        "ABL_INTERNAL_TOKEN",
    },
    "gateway": set(),
    "all": set(ALL_SECRETS),
}


@pytest.mark.parametrize("service", sorted(READS))
def test_each_service_reads_only_its_secrets(service: str) -> None:
    fields = SERVICE_SETTINGS[service].model_fields
    reads = {f"ABL_{name.upper()}" for name in SECRET_SETTINGS if name in fields}
    assert reads == READS[service]
    assert set(unused_secrets(SERVICE_SETTINGS[service], ALL_SECRETS)) == (
        set(ALL_SECRETS) - READS[service]
    )


def test_the_sender_has_no_database_admin_token_or_keys() -> None:
    fields = SenderSettings.model_fields
    assert not {"database_url", "admin_token", "encryption_keys"} & set(fields)
    assert "encryption_keys" not in SchedulerSettings.model_fields
    assert not {name for name in SECRET_SETTINGS if name in GatewaySettings.model_fields}


def test_each_service_starts_with_only_its_own_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_SECRETS:
        monkeypatch.delenv(name, raising=False)
    for service, reads in READS.items():
        with monkeypatch.context() as env:
            for name in reads:
                env.setenv(name, ALL_SECRETS[name])
            if "ABL_OAUTH_GOOGLE_CLIENT_SECRET" in reads:
                for name, value in OAUTH_COMPANIONS.items():
                    env.setenv(name, value)
            SERVICE_SETTINGS[service]()  # no error: nothing else is required


def test_the_combined_settings_are_every_service_s() -> None:
    for kind in (RegistrySettings, SchedulerSettings, SenderSettings, GatewaySettings):
        assert issubclass(Settings, kind)
        assert set(kind.model_fields) <= set(Settings.model_fields)


def test_a_secret_a_service_does_not_use_is_named_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="abl.settings")
    unused = warn_unused_secrets("sender", SenderSettings, ALL_SECRETS)
    assert unused == [
        "ABL_DATABASE_URL",
        "ABL_ADMIN_TOKEN",
        "ABL_ENCRYPTION_KEYS",
        "ABL_UNSUBSCRIBE_KEY",
        "ABL_UNSUBSCRIBE_OLD_KEYS",
        "ABL_OAUTH_GOOGLE_CLIENT_SECRET",
        "ABL_OAUTH_MICROSOFT_CLIENT_SECRET",
    ]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7
    assert all("sender" in line and "does not use" in line for line in lines)
    # The warning names the variable, never its value.
    assert not any(value in " ".join(lines) for value in ALL_SECRETS.values())


def test_a_real_gateway_process_warns_about_secrets_it_was_given(tmp_path: Path) -> None:
    """The gateway needs no secret and no broker: started with two, it serves and names both."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABL_")}
    env |= {
        "ABL_ENV": "test",
        "ABL_PORT": str(port),
        "ABL_ADMIN_TOKEN": ALL_SECRETS["ABL_ADMIN_TOKEN"],
        "ABL_ENCRYPTION_KEYS": ALL_SECRETS["ABL_ENCRYPTION_KEYS"],
    }
    log = tmp_path / "gateway.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--service", "gateway"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                ready = response.status_code == 200
            if ready:
                break
            time.sleep(0.2)
        assert ready, log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
    text = log.read_text()
    assert "ABL_ADMIN_TOKEN is set, but the gateway service does not use it" in text, text
    assert "ABL_ENCRYPTION_KEYS is set, but the gateway service does not use it" in text
    assert "ABL_INTERNAL_TOKEN" not in text
    assert ALL_SECRETS["ABL_ADMIN_TOKEN"] not in text
