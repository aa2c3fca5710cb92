"""Mailbox access per server: defaults from the provider, the IMAP check against a real
Dovecot (LOGIN, SELECT INBOX, LOGOUT, nothing changed), the address rules, encryption, and the
password rule on PATCH."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from services.registry import mailbox
from services.registry.models import ImapCreate, SmtpServer
from shared.crypto import Keyring, associated_data
from shared.imap import ImapEndpoint, ImapProblem, ImapSecurity, check
from tests.conftest import ACCOUNTS, Api
from tests.support.dovecot import DovecotServer
from tests.support.smtp import Certificates, SmtpTestServer
from tests.test_mailbox_reader import refusing_imap

LOGIN = "alice@example.com"


def server_body(smtp: SmtpTestServer, imap: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "host": "localhost",
        "port": smtp.port,
        "security": "starttls",
        "username": LOGIN,
        "password": ACCOUNTS[LOGIN],
        "from_email": LOGIN,
    }
    if imap is not None:
        body["imap"] = imap
    return body


@pytest.mark.parametrize(
    ("preset", "smtp_host", "username", "host", "port", "security"),
    [
        ("gmail", "smtp.gmail.com", "a@gmail.com", "imap.gmail.com", 993, "tls"),
        (None, "smtp.gmail.com", "a@acme.com", "imap.gmail.com", 993, "tls"),
        ("office365", "smtp.office365.com", "a@acme.com", "outlook.office365.com", 993, "tls"),
        ("outlook", "smtp-mail.outlook.com", "a@outlook.com", "outlook.office365.com", 993, "tls"),
        ("zoho", "smtp.zoho.com", "a@acme.com", "imap.zoho.com", 993, "tls"),
        ("yahoo", "smtp.mail.yahoo.com", "a@yahoo.com", "imap.mail.yahoo.com", 993, "tls"),
        ("icloud", "smtp.mail.me.com", "a@icloud.com", "imap.mail.me.com", 993, "tls"),
        ("fastmail", "smtp.fastmail.com", "a@fastmail.com", "imap.fastmail.com", 993, "tls"),
    ],
)
def test_imap_defaults_come_from_the_provider_and_the_smtp_login(
    preset: str | None, smtp_host: str, username: str, host: str, port: int, security: str
) -> None:
    endpoint = mailbox.endpoint_for(
        ImapCreate(), preset=preset, smtp_host=smtp_host, smtp_username=username, password="pw"
    )
    assert (endpoint.host, endpoint.port, endpoint.security.value) == (host, port, security)
    assert (endpoint.username, endpoint.password) == (username, "pw")
    starttls = mailbox.endpoint_for(
        ImapCreate(port=143),
        preset=preset,
        smtp_host=smtp_host,
        smtp_username=username,
        password="pw",
    )
    assert (starttls.port, starttls.security) == (143, ImapSecurity.starttls)


async def test_imap_is_checked_stored_encrypted_and_shown_without_password(
    api: Api, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    tenant = await api.new_tenant()
    dovecot.append(LOGIN, b"Subject: untouched\r\nMessage-ID: <u@x>\r\n\r\nbody\r\n")
    before = dovecot.flags(LOGIN)
    created = await api.client.post(
        "/v1/servers",
        json=server_body(
            starttls_server, {"host": "localhost", "port": dovecot.tls_port, "security": "tls"}
        ),
        headers=tenant,
    )
    assert created.status_code == 201, created.text
    imap = created.json()["imap"]
    assert imap == {
        "host": "localhost",
        "port": dovecot.tls_port,
        "security": "tls",
        "username": LOGIN,
        "has_password": True,
        "last_poll_at": None,
        "last_poll_error": None,
    }
    assert ACCOUNTS[LOGIN] not in created.text
    # The check read nothing and changed nothing: no \\Seen, nothing moved.
    assert dovecot.flags(LOGIN) == before

    keyring = Keyring.from_keys(api.settings.keys)
    async with api.app.state.sessions() as session:
        row = await session.get(SmtpServer, uuid.UUID(created.json()["id"]))
        assert row is not None
        assert row.imap_password_ciphertext is not None
        assert ACCOUNTS[LOGIN] not in row.imap_password_ciphertext
        assert mailbox.open_password(keyring, row) == ACCOUNTS[LOGIN]
        # Bound to its purpose: the SMTP column's associated data does not open it.
        with pytest.raises(Exception):  # noqa: B017, PT011 - any decryption failure
            keyring.decrypt(row.imap_password_ciphertext, associated_data(row.tenant_id, row.id))


async def test_a_refused_imap_login_stores_nothing(
    api: Api, starttls_server: SmtpTestServer, certs: Certificates
) -> None:
    # A server that refuses the login (not Dovecot: a refused login there delays every later
    # login from this address, other tests' included).
    refuser = await refusing_imap(certs)
    port = refuser.sockets[0].getsockname()[1]
    tenant = await api.new_tenant()
    try:
        refused = await api.client.post(
            "/v1/servers",
            json=server_body(
                starttls_server, {"host": "localhost", "port": port, "password": "wrong-password"}
            ),
            headers=tenant,
        )
    finally:
        refuser.close()
    assert refused.status_code == 422
    assert refused.json()["code"] == "imap_auth_failed"
    assert "wrong-password" not in refused.text
    assert (await api.client.get("/v1/servers", headers=tenant)).json()["items"] == []
    no_host = await api.client.post(
        "/v1/servers", json=server_body(starttls_server, {"port": 993}), headers=tenant
    )
    assert no_host.status_code == 422
    assert no_host.json()["code"] == "imap_incomplete"


async def test_patch_moves_imap_only_with_its_password(
    api: Api, starttls_server: SmtpTestServer, dovecot: DovecotServer
) -> None:
    tenant = await api.new_tenant()
    created = await api.client.post(
        "/v1/servers",
        json=server_body(starttls_server, {"host": "localhost", "port": dovecot.tls_port}),
        headers=tenant,
    )
    url = f"/v1/servers/{created.json()['id']}"
    moved = {"imap": {"host": "localhost", "port": dovecot.starttls_port, "security": "starttls"}}
    refused = await api.client.patch(url, json=moved, headers=tenant)
    assert refused.status_code == 422
    assert refused.json()["code"] == "imap_incomplete"
    assert refused.json()["errors"][0]["field"] == "body.imap.password"
    moved["imap"]["password"] = ACCOUNTS[LOGIN]
    done = await api.client.patch(url, json=moved, headers=tenant)
    assert done.status_code == 200, done.text
    assert (done.json()["imap"]["port"], done.json()["imap"]["security"]) == (
        dovecot.starttls_port,
        "starttls",
    )
    # The same endpoint again is checked with the stored password.
    again = await api.client.patch(
        url,
        json={"imap": {"host": "localhost", "port": dovecot.starttls_port, "security": "starttls"}},
        headers=tenant,
    )
    assert again.status_code == 200, again.text


@pytest.mark.parametrize(
    ("host", "port", "allow_private", "problem"),
    [
        ("localhost", 993, False, ImapProblem.blocked_host),
        ("127.0.0.1", 993, False, ImapProblem.blocked_host),
        ("10.1.2.3", 143, False, ImapProblem.blocked_host),
        ("imap.example.com", 25, False, ImapProblem.blocked_port),
        ("no-such-host.invalid", 993, True, ImapProblem.dns_failed),
    ],
)
async def test_imap_follows_the_address_rules(
    host: str, port: int, allow_private: bool, problem: ImapProblem
) -> None:
    endpoint = ImapEndpoint(host, port, ImapSecurity.tls, "a", "b")
    outcome = await check(endpoint, allow_private=allow_private, bound_seconds=5)
    assert outcome.problem is problem
