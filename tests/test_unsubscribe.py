"""One-click unsubscribe: the signed token, the headers on the wire (through a real SMTP
server), the public route, and tampered or reused links refused."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr

from services.scheduler import unsubscribe
from shared.settings import Settings
from tests.conftest import Api, make_settings, running
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, warm_up

KEY = unsubscribe.derive_key("an-unsubscribe-key-of-enough-length")
EMAIL = uuid.UUID("01a21cb1-596d-7fd8-be63-db4e57a0008a")
TENANT = uuid.UUID("01a21cb1-5978-7acf-b487-cddb52280b4d")


def test_a_token_names_one_recipient_of_one_email() -> None:
    token = unsubscribe.sign(KEY, EMAIL, TENANT, "Lead@example.org")
    assert re.match(unsubscribe.TOKEN_PATTERN, token)
    assert unsubscribe.email_of(token) == EMAIL
    assert unsubscribe.verify([KEY], token, EMAIL, TENANT, "lead@example.org")
    assert not unsubscribe.verify([KEY], token, EMAIL, TENANT, "other@example.org")
    assert not unsubscribe.verify([KEY], token, EMAIL, uuid.uuid4(), "lead@example.org")
    other_key = unsubscribe.derive_key("another-unsubscribe-key-of-length")
    assert not unsubscribe.verify([other_key], token, EMAIL, TENANT, "lead@example.org")
    for position in (0, 20, len(token) - 1):
        flipped = (
            token[:position] + ("A" if token[position] != "A" else "B") + token[position + 1 :]
        )
        assert not unsubscribe.verify([KEY], flipped, EMAIL, TENANT, "lead@example.org")


def test_a_rotated_key_still_verifies_the_links_it_signed() -> None:
    old = unsubscribe.keys_from(["the-key-that-signed-last-month!!"])
    token = unsubscribe.sign(old.signing, EMAIL, TENANT, "lead@example.org")
    rotated = unsubscribe.keys_from(
        ["the-new-key-of-this-month!!!!!!!", "the-key-that-signed-last-month!!"]
    )
    assert rotated.signing != old.signing  # new links are signed with the new key
    assert unsubscribe.verify(rotated.accepted, token, EMAIL, TENANT, "lead@example.org")
    dropped = unsubscribe.keys_from(["the-new-key-of-this-month!!!!!!!"])
    assert not unsubscribe.verify(dropped.accepted, token, EMAIL, TENANT, "lead@example.org")


@pytest.mark.parametrize("token", ["", "short", "x" * 44, "!" * 43, "a" * 42 + "/"])
def test_malformed_tokens_name_no_email(token: str) -> None:
    assert unsubscribe.email_of(token) is None


def test_the_mailto_subject_carries_the_token() -> None:
    token = unsubscribe.sign(KEY, EMAIL, TENANT, "lead@example.org")
    assert unsubscribe.token_in_subject(f"Re: unsubscribe {token}") == token
    assert unsubscribe.token_in_subject("unsubscribe me please") is None


@pytest.fixture
def https_settings(database_url: str) -> Settings:
    return make_settings(database_url, public_url="https://mail.abl.example")


@pytest.fixture
async def live(https_settings: Settings) -> AsyncIterator[Api]:
    async with running(https_settings, combined=True, loops=True) as api:
        yield api


async def wait_for_status(api: Api, tenant: dict[str, str], email_id: str, status: str) -> None:
    for _ in range(300):
        got = (await api.client.get(f"/v1/messages/{email_id}", headers=tenant)).json()
        if got["status"] == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"email {email_id} never became {status}: {got['status']}")


async def test_one_click_through_a_real_smtp_server(
    live: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await live.new_tenant()
    servers = await add_servers(live, tenant, starttls_server)
    await warm_up(live, servers)
    recipient = f"ok+{uuid.uuid4().hex[:8]}@example.org"
    plain = f"ok+{uuid.uuid4().hex[:8]}@example.org"
    accepted = await live.client.post(
        "/v1/messages",
        json={
            "messages": [
                {"to": recipient, "subject": "Hi", "text": "x", "unsubscribe": True},
                {"to": plain, "subject": "Hi", "text": "x"},
            ]
        },
        headers=tenant,
    )
    ids = accepted.json()["ids"]
    for email_id in ids:
        await wait_for_status(live, tenant, email_id, "sent")
    on_wire = {
        envelope.rcpt_tos[0]: email.message_from_bytes(
            envelope.original_content or b"", policy=email.policy.default
        )
        for envelope in list(starttls_server.recorder.messages)
        if envelope.rcpt_tos and envelope.rcpt_tos[0] in (recipient, plain)
    }
    assert "List-Unsubscribe" not in on_wire[plain]
    message = on_wire[recipient]
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    links = re.findall(r"<([^>]+)>", str(message["List-Unsubscribe"]))
    https, mailto = links
    assert https.startswith("https://mail.abl.example/v1/unsubscribe/")
    token = https.rsplit("/", 1)[1]
    sender = str(message["From"])
    assert mailto == f"mailto:{sender}?subject=unsubscribe%20{token}"

    path = urlsplit(https).path
    # Fetching the link (a scanner, a preview) changes nothing.
    page = await live.client.get(path)
    assert page.status_code == 200
    assert '<form method="post"' in page.text
    assert (await live.client.get("/v1/suppressions", headers=tenant)).json()["items"] == []

    tampered = path[:-1] + ("A" if path[-1] != "A" else "B")
    refused = await live.client.post(tampered, content=b"List-Unsubscribe=One-Click")
    assert refused.status_code == 404
    assert refused.json()["code"] == "unsubscribe_invalid"

    done = await live.client.post(
        path,
        content=b"List-Unsubscribe=One-Click",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert done.status_code == 200, done.text
    listed = (await live.client.get("/v1/suppressions", headers=tenant)).json()["items"]
    assert [(e["address"], e["source"]) for e in listed] == [(recipient, "unsubscribe")]

    reused = await live.client.post(path, content=b"List-Unsubscribe=One-Click")
    assert reused.status_code == 409
    assert reused.json()["code"] == "unsubscribe_used"

    again = await live.client.post(
        "/v1/messages", json={"to": recipient, "subject": "Hi", "text": "x"}, headers=tenant
    )
    assert again.json()["items"][0]["status"] == "suppressed"


async def test_unsubscribe_flag_and_own_header_do_not_mix(live: Api) -> None:
    tenant = await live.new_tenant()
    body = {
        "to": "a@example.org",
        "subject": "Hi",
        "text": "x",
        "unsubscribe": True,
        "headers": {"List-Unsubscribe": "<https://tenant.example/u>"},
    }
    refused = await live.client.post("/v1/messages", json=body, headers=tenant)
    assert refused.status_code == 422
    batch = {"messages": [{**body, "unsubscribe": False}], "unsubscribe": True}
    refused = await live.client.post("/v1/messages", json=batch, headers=tenant)
    assert refused.status_code == 422
    # Without the flag, a tenant's own List-Unsubscribe passes through.
    own = await live.client.post(
        "/v1/messages", json={**body, "unsubscribe": False}, headers=tenant
    )
    assert own.status_code == 202


async def test_links_already_sent_survive_a_key_rotation(
    https_settings: Settings, starttls_server: SmtpTestServer
) -> None:
    """A link signed before `ABL_UNSUBSCRIBE_KEY` changed works while the old key is listed in
    `ABL_UNSUBSCRIBE_OLD_KEYS`, and no longer once it is dropped."""
    recipient = f"ok+{uuid.uuid4().hex[:8]}@example.org"
    async with running(https_settings, combined=True, loops=True) as live:
        tenant = await live.new_tenant()
        await warm_up(live, await add_servers(live, tenant, starttls_server))
        accepted = await live.client.post(
            "/v1/messages",
            json={"to": recipient, "subject": "Hi", "text": "x", "unsubscribe": True},
            headers=tenant,
        )
        await wait_for_status(live, tenant, accepted.json()["ids"][0], "sent")
    envelope = next(e for e in list(starttls_server.recorder.messages) if e.rcpt_tos == [recipient])
    message = email.message_from_bytes(envelope.original_content or b"")
    path = urlsplit(re.findall(r"<(https[^>]+)>", str(message["List-Unsubscribe"]))[0]).path
    new_key = SecretStr("a-new-unsubscribe-key-after-rotation")
    dropped = https_settings.model_copy(update={"unsubscribe_key": new_key})
    async with running(dropped, combined=True) as api:
        refused = await api.client.post(path, content=b"List-Unsubscribe=One-Click")
        assert refused.status_code == 404
    rotated = https_settings.model_copy(
        update={
            "unsubscribe_key": new_key,
            "unsubscribe_old_keys": [https_settings.unsubscribe_key],
        }
    )
    async with running(rotated, combined=True) as api:
        done = await api.client.post(path, content=b"List-Unsubscribe=One-Click")
        assert done.status_code == 200, done.text
        listed = (await api.client.get("/v1/suppressions", headers=tenant)).json()["items"]
        assert [e["address"] for e in listed] == [recipient]
