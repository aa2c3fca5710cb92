"""The mailbox of a server connected with OAuth, read with its own grant (SASL XOAUTH2), against
a real Dovecot whose oauth2 passdb checks each access token at the test authorization server's
tokeninfo endpoint (as Gmail's IMAP checks Google's tokens): the check on PATCH, a DSN read back
into `bounced`, a token the IMAP server refuses refreshed once (in one process and over the
internal routes of the stack), a revoked grant shown as the last poll's error, and a canary
search for the tokens in responses, poll errors and logs."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from services.registry.keys import rotate_keys
from services.registry.models import SmtpServer
from services.registry.oauth.providers import PROVIDERS, configured
from services.scheduler.inbox import MailboxReader
from services.scheduler.mailbox_source import HttpMailboxSource
from services.sender.clients import token_digest
from shared.crypto import Keyring, generate_key
from shared.messages import Outcome
from shared.settings import decode_key
from tests.conftest import Api, make_settings, running
from tests.support import mailbox_messages as mail
from tests.support.dovecot import DovecotServer, dovecot_server
from tests.support.oauth import AuthorizationServer
from tests.support.smtp import Certificates, SmtpTestServer, free_port
from tests.test_oauth import API_BASE, connect, oauth_settings
from tests.test_oauth import authority as authority  # fixtures
from tests.test_oauth import oauth_smtp as oauth_smtp
from tests.test_scheduler_api import dispatcher, published_jobs, result_for, warm_up

USER = "o1@example.com"
# Only for the test's own APPEND of notifications into the mailbox: the product never has it.
APPEND_PASSWORD = "o1-append-only"


@pytest.fixture
def oauth_dovecot(certs: Certificates, authority: AuthorizationServer) -> Iterator[DovecotServer]:
    tokeninfo = f"{authority.base_url}/google/tokeninfo?access_token="
    with dovecot_server(certs, {USER: APPEND_PASSWORD}, oauth2_tokeninfo_url=tokeninfo) as server:
        yield server


@pytest.fixture
async def api(
    database_url: str,
    authority: AuthorizationServer,
    oauth_smtp: SmtpTestServer,
    oauth_dovecot: DovecotServer,
) -> AsyncIterator[Api]:
    settings = oauth_settings(
        database_url,
        authority,
        oauth_smtp,
        oauth_google_imap_host="localhost",
        oauth_google_imap_port=oauth_dovecot.tls_port,
        # Another name for the same Dovecot: each provider has its own IMAP host.
        oauth_microsoft_imap_host="127.0.0.1",
        oauth_microsoft_imap_port=oauth_dovecot.tls_port,
        # Each login makes Dovecot's auth process ask the test's authorization server about
        # the token over HTTPS: under a loaded CI machine that hop alone took over 5 s once.
        inbox_timeout_seconds=30.0,
        inbox_poll_seconds=0.001,  # every mailbox due again right after a read
    )
    async with running(settings, combined=True) as value:
        yield value


def reader(api: Api) -> MailboxReader:
    value: MailboxReader = api.app.state.mailbox_reader
    return value


async def oauth_server_with_mailbox(
    api: Api, authority: AuthorizationServer, tenant: dict[str, str]
) -> str:
    server_id = (await connect(api, authority, tenant, USER))["server_id"]
    before = authority.tokeninfo_calls
    added = await api.client.patch(f"/v1/servers/{server_id}", json={"imap": {}}, headers=tenant)
    assert added.status_code == 200, added.text
    # Checked with the access token: Dovecot asked the authorization server about it.
    assert authority.tokeninfo_calls == before + 1
    return server_id


async def sent_email(api: Api, tenant: dict[str, str], server_id: str, to: str) -> str:
    posted = await api.client.post(
        "/v1/messages",
        json={"messages": [{"to": to, "subject": "Hi", "text": "x"}]},
        headers=tenant,
    )
    email_id: str = posted.json()["ids"][0]
    await dispatcher(api).tick()
    for job in published_jobs(api):
        assert str(job.server_id) == server_id
        assert await api.app.state.result_applier.apply(
            result_for(job, Outcome.sent, data_completed=True)
        )
    return email_id


async def status_of(api: Api, tenant: dict[str, str], email_id: str) -> str:
    found = await api.client.get(f"/v1/messages/{email_id}", headers=tenant)
    status: str = found.json()["status"]
    return status


async def test_an_oauth_mailbox_is_checked_and_read_with_xoauth2(
    api: Api,
    authority: AuthorizationServer,
    oauth_dovecot: DovecotServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    tenant = await api.new_tenant()
    server_id = await oauth_server_with_mailbox(api, authority, tenant)
    view = (await api.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()
    seen.append(str(view))
    assert view["imap"]["host"] == "localhost"
    assert view["imap"]["port"] == oauth_dovecot.tls_port
    assert view["imap"]["username"] == USER
    assert "password" not in view["imap"]

    # The token goes to the provider's IMAP server and the grant's account only.
    for imap, field in (({"host": "imap.example.net"}, "password"), ({"username": "x@y.z"}, "")):
        refused = await api.client.patch(
            f"/v1/servers/{server_id}", json={"imap": imap}, headers=tenant
        )
        seen.append(refused.text)
        assert refused.status_code == 422
        assert refused.json()["code"] == "imap_incomplete"
        assert field in refused.json()["errors"][0]["field"]

    # The internal route gives an access token only, never the refresh token.
    access = await api.client.get(
        f"/internal/v1/servers/{server_id}/imap-credentials", headers=api.internal()
    )
    assert access.status_code == 200
    assert access.headers["cache-control"] == "no-store"
    body = access.json()
    assert (body["auth"], body["password"]) == ("xoauth2", "")
    assert body["access_token"] in authority.tokens
    assert not set(authority.issued_refresh_tokens) & set(access.text.split('"'))

    async def bounce_is_read(lead: str) -> None:
        """A hard bounce placed in the mailbox: the email becomes `bounced`."""
        email_id = await sent_email(api, tenant, server_id, lead)
        oauth_dovecot.append(USER, mail.dsn(lead, mail.our_message_id(email_id, "example.com")))
        assert await reader(api).poll_all() == {uuid.UUID(server_id): None}
        assert await status_of(api, tenant, email_id) == "bounced"

    run = uuid.uuid4().hex[:6]
    await warm_up(api, [server_id])
    await bounce_is_read(f"gone.{run}@example.org")
    assert authority.refreshes[USER] == 0

    # The provider ends the token early: Dovecot refuses it, the reader gets one new token
    # (one refresh) and reads on.
    authority.expire_tokens(USER)
    await bounce_is_read(f"left.{run}@example.org")
    assert authority.refreshes[USER] == 1

    # Revoked: the poll's error says what to do; the mailbox is not read.
    authority.revoke(USER)
    authority.expire_tokens(USER)
    errors = await reader(api).poll_all()
    assert errors[uuid.UUID(server_id)] is not None
    view = (await api.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()
    seen.append(str(view))
    assert "OAuth grant is gone" in view["imap"]["last_poll_error"]
    assert "reconnect" in view["imap"]["last_poll_error"]
    assert view["status"] == "auth_failed"  # the same grant sends: the scheduler stops too
    # Found gone once: the next reads do not ask the provider again.
    refreshes = authority.refreshes[USER]
    await reader(api).poll_all()
    assert authority.refreshes[USER] == refreshes

    seen.extend(record.getMessage() for record in caplog.records)
    seen.extend(str(record.args) for record in caplog.records)
    text = "\n".join(seen)
    for secret in [*authority.tokens, *authority.issued_refresh_tokens]:
        assert secret not in text


async def test_the_stack_s_reader_refreshes_a_refused_token_once_over_the_internal_routes(
    api: Api, authority: AuthorizationServer, oauth_dovecot: DovecotServer
) -> None:
    tenant = await api.new_tenant()
    server_id = await oauth_server_with_mailbox(api, authority, tenant)
    path = f"/internal/v1/servers/{server_id}/imap-credentials"
    current = (await api.client.get(path, headers=api.internal())).json()["access_token"]
    authority.expire_tokens(USER)

    # Two readers that saw the same token refused get the same new one: one refresh.
    answers = [
        await api.client.post(
            f"{path}/refresh",
            json={"rejected_token_sha256": token_digest(current)},
            headers=api.internal(),
        )
        for _ in range(2)
    ]
    assert [a.status_code for a in answers] == [200, 200]
    renewed = {a.json()["access_token"] for a in answers}
    assert len(renewed) == 1
    assert current not in renewed
    assert authority.refreshes[USER] == 1

    # The stack's reader (HTTP to the registry) with a token Dovecot refuses: one refresh.
    authority.expire_tokens(USER)
    source = HttpMailboxSource(
        api.client, api.settings.internal_token.get_secret_value(), api.app.state.sessions
    )
    stack_reader = MailboxReader(api.settings, api.app.state.sessions, source, allow_private=True)
    try:
        assert await stack_reader.poll_all() == {uuid.UUID(server_id): None}
    finally:
        stack_reader.close()
    assert authority.refreshes[USER] == 2

    missing = await api.client.post(
        f"/internal/v1/servers/{uuid.uuid4()}/imap-credentials/refresh",
        json={"rejected_token_sha256": "0" * 64},
        headers=api.internal(),
    )
    assert (missing.status_code, missing.json()["code"]) == (404, "mailbox_not_found")


async def test_a_connection_asking_for_the_mailbox_checks_it_at_the_callback(
    api: Api, authority: AuthorizationServer, oauth_dovecot: DovecotServer
) -> None:
    tenant = await api.new_tenant()
    # An IMAP port nothing listens on: the callback lands with the IMAP check's code and
    # nothing is stored.
    failed = await connect(api, authority, tenant, USER, imap={"port": free_port()})
    assert failed == {"error": "imap_connect_failed"}
    listed = await api.client.get("/v1/servers", headers=tenant)
    assert listed.json()["items"] == []

    before = authority.tokeninfo_calls
    connected = await connect(api, authority, tenant, USER, "microsoft", imap={})
    assert authority.tokeninfo_calls == before + 1  # Dovecot asked about the new token
    view = (await api.client.get(f"/v1/servers/{connected['server_id']}", headers=tenant)).json()
    assert view["imap"]["port"] == oauth_dovecot.tls_port
    assert view["imap"]["username"] == USER
    assert await reader(api).poll_all() == {uuid.UUID(connected["server_id"]): None}


async def read_with_xoauth2(api: Api, authority: AuthorizationServer, server_id: str) -> None:
    """The reader gets an access token for the mailbox and Dovecot checks it."""
    access = await api.client.get(
        f"/internal/v1/servers/{server_id}/imap-credentials", headers=api.internal()
    )
    assert access.status_code == 200, access.text
    assert (access.json()["auth"], access.json()["password"]) == ("xoauth2", "")
    before = authority.tokeninfo_calls
    assert await reader(api).poll_all() == {uuid.UUID(server_id): None}
    assert authority.tokeninfo_calls > before


async def test_key_rotation_keeps_a_mailbox_read_with_the_grant(
    api: Api, authority: AuthorizationServer
) -> None:
    tenant = await api.new_tenant()
    server_id = await oauth_server_with_mailbox(api, authority, tenant)
    sessions = api.app.state.sessions

    # Everything is under the first key already: nothing to re-encrypt, and the mailbox (no
    # IMAP password) is not given an empty one.
    report = await rotate_keys(sessions, Keyring.from_keys(api.settings.keys))
    await read_with_xoauth2(api, authority, server_id)
    assert report.reencrypted == 0

    # Under a new key: the tokens move, the mailbox still has no password of its own.
    new_key = decode_key(generate_key())
    assert (await rotate_keys(sessions, Keyring.from_keys([new_key, *api.settings.keys]))) == (
        type(report)(examined=1, reencrypted=1)
    )
    async with sessions() as session:
        row = await session.get(SmtpServer, uuid.UUID(server_id))
        assert row is not None
        assert row.imap_password_ciphertext is None
        assert row.imap_host == "localhost"


async def test_a_reconnect_under_another_provider_moves_the_mailbox_to_its_imap_server(
    api: Api, authority: AuthorizationServer, oauth_dovecot: DovecotServer
) -> None:
    tenant = await api.new_tenant()
    server_id = await oauth_server_with_mailbox(api, authority, tenant)
    # The same address, reconnected under Microsoft without an imap object.
    again = await connect(api, authority, tenant, USER, "microsoft", server_id=server_id)
    assert again == {"server_id": server_id}
    view = (await api.client.get(f"/v1/servers/{server_id}", headers=tenant)).json()
    assert (view["imap"]["host"], view["imap"]["port"]) == ("127.0.0.1", oauth_dovecot.tls_port)
    assert view["imap"]["username"] == USER
    await read_with_xoauth2(api, authority, server_id)

    # A row that names another provider's IMAP host (as one stored before this was kept in
    # step) gets no token: the mailbox is not read.
    async with api.app.state.sessions() as session, session.begin():
        row = await session.get(SmtpServer, uuid.UUID(server_id))
        assert row is not None
        row.imap_host = "localhost"  # Google's in this test
    access = await api.client.get(
        f"/internal/v1/servers/{server_id}/imap-credentials", headers=api.internal()
    )
    assert (access.status_code, access.json()["code"]) == (404, "mailbox_not_found")
    before = authority.tokeninfo_calls
    assert uuid.UUID(server_id) not in await reader(api).poll_all()
    assert authority.tokeninfo_calls == before


def test_the_provider_table_names_imap_and_its_scopes_and_both_can_be_overridden() -> None:
    assert (PROVIDERS["google"].imap_host, PROVIDERS["google"].imap_port) == ("imap.gmail.com", 993)
    assert "https://mail.google.com/" in PROVIDERS["google"].scopes  # SMTP and IMAP alike
    microsoft = PROVIDERS["microsoft"]
    assert (microsoft.imap_host, microsoft.imap_port) == ("outlook.office365.com", 993)
    assert {
        "https://outlook.office.com/SMTP.Send",
        "https://outlook.office.com/IMAP.AccessAsUser.All",
    } <= set(microsoft.scopes)
    settings = make_settings(
        "sqlite+aiosqlite:///unused.db",
        oauth_microsoft_client_id="client",
        oauth_microsoft_client_secret="secret",
        oauth_microsoft_imap_host="imap.example.us",
        oauth_microsoft_imap_port=1993,
        oauth_microsoft_scopes="openid email https://outlook.example.us/SMTP.Send",
        oauth_redirect_base_url=API_BASE,
    )
    found = configured(settings)["microsoft"]
    assert (found.imap_host, found.imap_port) == ("imap.example.us", 1993)
    assert found.scope == "openid email https://outlook.example.us/SMTP.Send"
