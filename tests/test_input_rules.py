"""Refused at the door, not stuck inside: every line or paragraph separator, lone surrogate and
unencodable address answers 422 naming the field, and what the API accepts the sender can
always encode."""

from __future__ import annotations

import email
import email.policy
import json
import sys
import typing
import unicodedata
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr, ValidationError

from services.registry.models import SmtpServerCreate, SmtpServerUpdate, TenantCreate
from services.scheduler.models import EmailCreate, SendingProfileUpdate
from services.sender.message import build_message, wire_bytes
from shared.messages import EmailContent
from shared.settings import Settings
from shared.validation import LINE_BREAKS
from tests.conftest import Api, make_settings, running
from tests.support.smtp import SmtpTestServer
from tests.test_scheduler_api import add_servers, dispatcher, published_jobs, warm_up

# Derived from Python itself rather than copied from the code under test: every character
# `str.splitlines()` breaks on, and every character of the Unicode line (Zl) and paragraph (Zp)
# separator categories.
SEPARATORS = sorted(
    {chr(c) for c in range(sys.maxunicode + 1) if len(f"a{chr(c)}b".splitlines()) > 1}
    | {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Zl", "Zp")}
)
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
NAMES = {c: f"U+{ord(c):04X}" for c in SEPARATORS + SURROGATES}

GOOD_EMAIL: dict[str, Any] = {
    "to": "lead@example.org",
    "reply_to": "replies@example.org",
    "subject": "Hello",
    "text": "Hi there",
    "html": "<p>Hi there</p>",
    "campaign": "november",
    "sequence": "intro",
    "idempotency_key": "key-1",
    "headers": {"X-Campaign": "november"},
}
# Where a poisoned character goes, and the field path the 422 must name.
EMAIL_FIELDS: dict[str, Any] = {
    "to": lambda c: {"to": f"lead{c}@example.org"},
    "to (end)": lambda c: {"to": f"lead@example.org{c}"},
    "reply_to": lambda c: {"reply_to": f"{c}replies@example.org"},
    "subject": lambda c: {"subject": f"Hello{c}Bcc: victim@example.net"},
    "subject (end)": lambda c: {"subject": f"Hello{c}"},
    "campaign": lambda c: {"campaign": f"nov{c}"},
    "sequence": lambda c: {"sequence": f"intro{c}"},
    "idempotency_key": lambda c: {"idempotency_key": f"key{c}"},
    "header value": lambda c: {"headers": {"X-Campaign": f"nov{c}X-Injected: yes"}},
    "header name": lambda c: {"headers": {f"X-Camp{c}aign": "november"}},
}
EMAIL_FIELD_PATHS = {
    "to": "to",
    "to (end)": "to",
    "reply_to": "reply_to",
    "subject": "subject",
    "subject (end)": "subject",
    "campaign": "campaign",
    "sequence": "sequence",
    "idempotency_key": "idempotency_key",
    "header value": "headers",
    "header name": "headers",
}


def poisoned_batch(char: str, *, bodies: bool) -> tuple[dict[str, Any], dict[int, str]]:
    """One message per field, each with `char` in that field; and the path each must name."""
    fields = dict(EMAIL_FIELDS)
    paths = dict(EMAIL_FIELD_PATHS)
    if bodies:  # a body may hold line breaks, but no lone surrogate
        fields |= {"text": lambda c: {"text": f"Hi{c}"}, "html": lambda c: {"html": f"<p>{c}"}}
        paths |= {"text": "text", "html": "html"}
    messages, expected = [], {}
    for index, (name, poison) in enumerate(fields.items()):
        messages.append({**GOOD_EMAIL, "idempotency_key": f"k{index}"} | poison(char))
        expected[index] = paths[name]
    return {"messages": messages}, expected


def as_json(body: Any) -> dict[str, Any]:
    """Keyword arguments for a JSON request whose strings may hold lone surrogates: JSON spells
    them as `\\udXXX` escapes (ensure_ascii), which httpx's own encoder cannot produce."""
    return {
        "content": json.dumps(body, ensure_ascii=True),
        "headers": {"content-type": "application/json"},
    }


def named_fields(problem: dict[str, Any]) -> dict[int, str]:
    named: dict[int, str] = {}
    for error in problem["errors"]:
        parts = error["field"].split(".")
        assert parts[:2] == ["body", "messages"], error
        named.setdefault(int(parts[2]), parts[3])
    return named


def assert_no_echo(problem: dict[str, Any], char: str) -> None:
    text = str(problem)
    for echoed in ("victim@example.net", "X-Injected", "X-Camp", "lead", "replies"):
        assert echoed not in text.replace("'to'", ""), (echoed, problem)
    assert char not in text


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings, combined=True) as api:
        yield api


@pytest.fixture
async def sqlite_app(sqlite_url: str) -> AsyncIterator[Api]:
    """Validation does not depend on the database: one kind is enough for the big matrices."""
    async with running(make_settings(sqlite_url), combined=True) as api:
        yield api


def test_the_separator_list_is_what_the_issue_names() -> None:
    assert {"\u2028", "\u2029", "\u0085", "\r", "\n"} <= set(SEPARATORS)
    assert set(SEPARATORS) == set(LINE_BREAKS)
    assert len(SEPARATORS) == 10


@pytest.mark.parametrize("char", SEPARATORS + SURROGATES, ids=NAMES.get)
async def test_every_message_field_refuses_separators_and_surrogates(
    sqlite_app: Api, char: str
) -> None:
    tenant = await sqlite_app.new_tenant()
    body, expected = poisoned_batch(char, bodies=char in SURROGATES)
    request = as_json(body)
    request["headers"] |= tenant
    response = await sqlite_app.client.post("/v1/messages", **request)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert named_fields(problem) == expected
    assert_no_echo(problem, char)
    listing = await sqlite_app.client.get("/v1/messages", headers=tenant)
    assert listing.json()["items"] == []


async def test_refused_emails_never_reach_the_sender(
    app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await app.new_tenant()
    await warm_up(app, await add_servers(app, tenant, starttls_server))
    for char in SEPARATORS + SURROGATES:
        body, _ = poisoned_batch(char, bodies=char in SURROGATES)
        request = as_json(body)
        request["headers"] |= tenant
        response = await app.client.post("/v1/messages", **request)
        assert response.status_code == 422
    for to in ("lead\u00e9@example.org", "\u7528\u6237@example.org"):
        response = await app.client.post(
            "/v1/messages", json=GOOD_EMAIL | {"to": to}, headers=tenant
        )
        assert response.status_code == 422
    good = await app.client.post("/v1/messages", json=GOOD_EMAIL, headers=tenant)
    assert good.status_code == 202, good.text
    await dispatcher(app).tick()
    jobs = published_jobs(app)
    assert [str(job.email_id) for job in jobs] == good.json()["ids"]


@pytest.mark.parametrize("field", ["to", "reply_to"])
@pytest.mark.parametrize(
    "address",
    ["lead\u00e9@example.org", "\u7528\u6237@example.org", "\u00fc@b\u00fccher.de"],
)
async def test_a_non_ascii_local_part_is_refused_clearly(
    sqlite_app: Api, field: str, address: str
) -> None:
    tenant = await sqlite_app.new_tenant()
    response = await sqlite_app.client.post(
        "/v1/messages", json=GOOD_EMAIL | {field: address}, headers=tenant
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"] == f"body.{field}"
    assert error["type"] == "address_not_ascii"
    assert "SMTPUTF8" in error["message"]


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("lead@b\u00fccher.de", "lead@xn--bcher-kva.de"),
        ("lead@\u4f8b\u3048.\u30c6\u30b9\u30c8", "lead@xn--r8jz45g.xn--zckzah"),
        ("lead@xn--bcher-kva.de", "lead@xn--bcher-kva.de"),
        ("lead@M\u00dcNCHEN.de", "lead@xn--mnchen-3ya.de"),
    ],
)
async def test_an_internationalised_domain_is_stored_in_idna_form(
    sqlite_app: Api, typed: str, stored: str
) -> None:
    tenant = await sqlite_app.new_tenant()
    response = await sqlite_app.client.post(
        "/v1/messages", json=GOOD_EMAIL | {"to": typed, "reply_to": typed}, headers=tenant
    )
    assert response.status_code == 202, response.text
    [email_id] = response.json()["ids"]
    email_ = (await sqlite_app.client.get(f"/v1/messages/{email_id}", headers=tenant)).json()
    assert (email_["to"], email_["reply_to"]) == (stored, stored)


SERVER_STRING_FIELDS = {
    "label": "primary",
    "from_name": "Alice",
    "host": "smtp.example.com",
    "username": "alice@example.com",
    "password": "app-password",
    "from_email": "alice@example.com",
    "preset": "gmail",
}


@pytest.mark.parametrize("char", SEPARATORS + SURROGATES, ids=NAMES.get)
async def test_every_server_field_refuses_separators_and_surrogates(
    sqlite_app: Api, char: str
) -> None:
    tenant = await sqlite_app.new_tenant()
    poisoned = {name: value + char for name, value in SERVER_STRING_FIELDS.items()}
    body = {"port": 587, "security": "starttls", **poisoned}
    request = as_json(body)
    request["headers"] |= tenant
    response = await sqlite_app.client.post("/v1/servers", **request)
    assert response.status_code == 422, response.text
    fields = {error["field"] for error in response.json()["errors"]}
    assert fields == {f"body.{name}" for name in SERVER_STRING_FIELDS}
    assert char not in response.text
    assert "app-password" not in response.text

    # The same on a change, where every field is optional.
    server_id = "01900000-0000-7000-8000-000000000000"
    request = as_json({k: v for k, v in poisoned.items() if k != "preset"})
    request["headers"] |= tenant
    patched = await sqlite_app.client.patch(f"/v1/servers/{server_id}", **request)
    assert patched.status_code == 422, patched.text
    fields = {error["field"] for error in patched.json()["errors"]}
    assert fields == {f"body.{name}" for name in SERVER_STRING_FIELDS if name != "preset"}

    request = as_json({"name": f"acme{char}"})
    request["headers"] |= sqlite_app.admin()
    tenant_name = await sqlite_app.client.post("/v1/tenants", **request)
    assert tenant_name.status_code == 422
    assert [e["field"] for e in tenant_name.json()["errors"]] == ["body.name"]


async def test_a_password_with_a_lone_surrogate_is_422_not_500(
    sqlite_app: Api, starttls_server: SmtpTestServer
) -> None:
    tenant = await sqlite_app.new_tenant()
    body = {
        "host": "localhost",
        "port": starttls_server.port,
        "security": "starttls",
        "username": "alice@example.com",
        "password": "pw\ud800",
        "from_email": "alice@example.com",
    }
    request = as_json(body)
    request["headers"] |= tenant
    response = await sqlite_app.client.post("/v1/servers", **request)
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"] == "body.password"
    assert "surrogate" in error["message"]


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("SMTP.xn--BCHER-kva.de", "smtp.xn--bcher-kva.de"),
        ("smtp.example.com.", "smtp.example.com."),
        ("2001:DB8::0:1", "2001:db8::1"),
    ],
)
def test_a_host_is_stored_lowercase(typed: str, stored: str) -> None:
    body = SmtpServerCreate.model_validate(
        {"host": typed, "port": 587, "security": "tls", "username": "u", "password": "p"}
        | {"from_email": "a@example.com"}
    )
    assert body.host == stored


@pytest.mark.parametrize("host", ["smtp.b\u00fccher.de", " smtp.example.com", "fe80::1%eth0"])
def test_a_host_outside_the_spec_pattern_is_refused(host: str) -> None:
    # The spec's pattern is the rule (a generated client checks against it), so nothing it
    # refuses is converted or trimmed into something accepted: a Unicode name is given in its
    # IDNA form, and the message says so.
    with pytest.raises(ValidationError) as raised:
        SmtpServerCreate.model_validate(
            {"host": host, "port": 587, "security": "tls", "username": "u", "password": "p"}
            | {"from_email": "a@example.com"}
        )
    [error] = raised.value.errors()
    assert error["loc"] == ("host",)
    if not host.isascii():
        assert "xn--" in error["msg"]


@pytest.mark.parametrize(
    "host", ["user@127.0.0.1", "smtp example.com", "-smtp.example.com", "a..b"]
)
def test_a_host_that_is_no_host_name_is_refused_before_dns(host: str) -> None:
    with pytest.raises(ValidationError) as raised:
        SmtpServerCreate.model_validate(
            {"host": host, "port": 587, "security": "tls", "username": "u", "password": "p"}
            | {"from_email": "a@example.com"}
        )
    assert [e["loc"] for e in raised.value.errors()] == [("host",)]
    assert host not in str(raised.value.errors(include_input=False))


# Every input model, with one valid body: each of its string fields is poisoned in turn. A
# field added later is covered without anyone remembering to add it here.
INPUT_MODELS: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (EmailCreate, GOOD_EMAIL),
    (
        SmtpServerCreate,
        {"port": 587, "security": "starttls", **SERVER_STRING_FIELDS, "host": "smtp.example.com"},
    ),
    (SmtpServerUpdate, {k: v for k, v in SERVER_STRING_FIELDS.items() if k != "preset"}),
    (TenantCreate, {"name": "acme"}),
    (SendingProfileUpdate, {"time_zone": "Europe/Paris", "start_hour": 8, "end_hour": 18}),
]


BODY_FIELDS = frozenset({"text", "html"})


def holds_text(annotation: Any) -> bool:
    """A str, SecretStr or email field (optional or not); a dict field has its own test."""
    if annotation in (str, SecretStr):
        return True
    if typing.get_origin(annotation) is dict:
        return False
    return any(holds_text(arg) for arg in typing.get_args(annotation))


def string_fields(body: dict[str, Any]) -> list[str]:
    return [name for name, value in body.items() if isinstance(value, str)]


@pytest.mark.parametrize(("model", "body"), INPUT_MODELS, ids=lambda v: getattr(v, "__name__", ""))
def test_input_models_cover_every_string_field(
    model: type[BaseModel], body: dict[str, Any]
) -> None:
    model.model_validate(body)  # the base body is valid
    declared = {name for name, info in model.model_fields.items() if holds_text(info.annotation)}
    assert declared <= set(string_fields(body)), declared - set(string_fields(body))
    refused = 0
    for name in string_fields(body):
        for char in SEPARATORS + SURROGATES:
            for poisoned in (body[name] + char, char + body[name], body[name][:1] + char):
                if name in BODY_FIELDS and char in SEPARATORS:
                    model.model_validate(body | {name: poisoned})  # a body has lines
                    continue
                with pytest.raises(ValidationError) as raised:
                    model.model_validate(body | {name: poisoned})
                assert {e["loc"][0] for e in raised.value.errors()} == {name}
                refused += 1
    one_line = [name for name in string_fields(body) if name not in BODY_FIELDS]
    bodies = [name for name in string_fields(body) if name in BODY_FIELDS]
    expected = (len(one_line) * len(SEPARATORS + SURROGATES) + len(bodies) * len(SURROGATES)) * 3
    assert refused == expected


# What the API accepts, the sender's encoder takes: any text at all is drawn (surrogates and
# separators included), and an email that passes validation must build, encode to ASCII bytes
# and parse back with the same subject and headers: nothing injected, nothing lost.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
ADDRESSES = st.one_of(
    st.emails(),
    st.builds(
        lambda local, domain: f"{local}@{domain}",
        ANY_TEXT,
        st.sampled_from(["example.org", "b\u00fccher.de", "\u4f8b\u3048.jp"]),
    ),
)


@given(
    to=ADDRESSES,
    subject=ANY_TEXT,
    header_value=ANY_TEXT,
    text=ANY_TEXT,
    from_name=ANY_TEXT,
)
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
def test_whatever_the_api_accepts_the_sender_encodes(
    to: str, subject: str, header_value: str, text: str, from_name: str
) -> None:
    try:
        accepted = EmailCreate.model_validate(
            {"to": to, "subject": subject, "text": text or "x", "headers": {"X-Tag": header_value}}
        )
        server = SmtpServerCreate.model_validate(
            {"host": "smtp.example.com", "port": 587, "security": "tls", "username": "u"}
            | {"password": "p", "from_email": "sender@example.com", "from_name": from_name}
        )
    except ValidationError:
        return
    message = build_message(
        EmailContent(
            to=accepted.to,
            subject=accepted.subject,
            text=accepted.text,
            headers=accepted.headers,
            message_id="abl.1",
        ),
        from_email=str(server.from_email),
        from_name=server.from_name,
        now=datetime(2026, 1, 1, tzinfo=UTC),
    )
    wire = wire_bytes(message)
    head = wire.partition(b"\r\n\r\n")[0]
    assert head.isascii(), head
    assert accepted.to.isascii()
    parsed = email.message_from_bytes(wire[: -len(b".\r\n")], policy=email.policy.default)
    assert parsed["Subject"] == accepted.subject.strip() or parsed["Subject"] == accepted.subject
    assert list(parsed.keys()).count("X-Tag") == 1


def test_secret_fields_are_checked_in_their_secret_form() -> None:
    # SecretStr hides its value from repr and errors; the rule must still see it.
    with pytest.raises(ValidationError):
        SmtpServerUpdate.model_validate({"password": SecretStr("pw\u2028")})


# A fuzz through the API: bodies whose fields are anything JSON can hold (surrogates and
# separators included), sent to every route that takes a server or a message. No 500.
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), ANY_TEXT
)
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=6,
)


def fuzzed(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Each key of `valid` kept, dropped, or given any JSON value; sometimes a stray key."""

    def appended(value: Any) -> st.SearchStrategy[str]:
        return ANY_TEXT.map(lambda text: f"{value}{text}")

    def assemble(values: dict[str, Any], drop: set[str], extra: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in values.items() if k not in drop} | extra

    per_key = {
        key: st.one_of(st.just(value), ANY_JSON, appended(value)) for key, value in valid.items()
    }
    return st.builds(
        assemble,
        st.fixed_dictionaries(per_key),
        st.sets(st.sampled_from(sorted(valid))),
        st.dictionaries(ANY_TEXT, ANY_JSON, max_size=1),
    )


FUZZ_SERVER = {
    "host": "smtp.example.com",
    "port": 587,
    "security": "starttls",
    "username": "alice@example.com",
    "password": "app-password",
    "from_email": "alice@example.com",
    "from_name": "Alice",
    "label": "primary",
    "daily_cap": 100,
    "preset": "gmail",
}
FUZZ_EMAIL = GOOD_EMAIL | {"headers": {"X-Tag": "a"}}
FUZZ_EXAMPLES = 250


@pytest.fixture
def fuzz_client(sqlite_url: str) -> Any:
    from fastapi.testclient import TestClient

    from services.app import create_app as create_all

    # Private hosts forbidden, and no name resolves to a usable address: a fuzzed body that
    # passes validation is refused by the address rules without any connection.
    app = create_all(make_settings(sqlite_url, allow_private_hosts=False), run_loops=False)
    with pytest.MonkeyPatch.context() as patch, TestClient(app) as client:

        async def resolve(host: str, port: int) -> list[Any]:
            import ipaddress

            return [ipaddress.ip_address("192.0.2.1")]

        patch.setattr("shared.addresses.resolve", resolve)
        yield client


def fuzz_call(
    client: Any, method: str, url: str, body: Any, headers: dict[str, str], seen: Counter[str]
) -> None:
    response = client.request(
        method,
        url,
        content=json.dumps(body, ensure_ascii=True),
        headers=headers | {"content-type": "application/json"},
    )
    assert response.status_code < 500, (method, url, response.text)
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
    seen[f"{method} {url.split('/')[2]} {response.status_code}"] += 1


async def stored_server(app: Any) -> str:
    """A server row written directly: with every address forbidden, none can pass a check."""
    from services.registry.domain import Security
    from services.registry.models import SmtpServer, Tenant
    from services.registry.repository import seal_password
    from shared.tenancy import hash_api_key

    async with app.state.sessions() as session, session.begin():
        tenant = Tenant(name="fuzz", api_key_hash=hash_api_key("abl_fuzz"), api_key_prefix="abl_")
        server = SmtpServer(
            tenant_id=tenant.id,
            host="smtp.example.com",
            port=587,
            security=Security.starttls,
            username="alice@example.com",
            from_email="alice@example.com",
            password_ciphertext="",
        )
        seal_password(app.state.keyring, server, "stored-password")
        session.add(tenant)
        await session.flush()
        session.add(server)
    return str(server.id)


def test_fuzzed_server_and_message_bodies_never_get_a_500(fuzz_client: Any) -> None:
    settings_ = fuzz_client.app.state.settings
    admin = {"Authorization": f"Bearer {settings_.admin_token.get_secret_value()}"}
    server_url = f"/v1/servers/{fuzz_client.portal.call(stored_server, fuzz_client.app)}"
    tenant = {"Authorization": "Bearer abl_fuzz"}
    seen: Counter[str] = Counter()

    @given(server=fuzzed(FUZZ_SERVER), email_=fuzzed(FUZZ_EMAIL), name=ANY_TEXT | ANY_JSON)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
    def exercise(server: dict[str, Any], email_: dict[str, Any], name: Any) -> None:
        fuzz_call(fuzz_client, "POST", "/v1/servers", server, tenant, seen)
        fuzz_call(fuzz_client, "PATCH", server_url, server, tenant, seen)
        fuzz_call(fuzz_client, "POST", "/v1/messages", email_, tenant, seen)
        batch = {"messages": [email_, email_ | {"idempotency_key": None}]}
        fuzz_call(fuzz_client, "POST", "/v1/messages", batch, tenant, seen)
        fuzz_call(fuzz_client, "POST", "/v1/tenants", {"name": name}, admin, seen)

    exercise()
    print(dict(sorted(seen.items())))
    assert sum(seen.values()) == 5 * FUZZ_EXAMPLES
    # The fuzz reached past validation on every route, not only into 422s.
    for route, success in (
        ("PATCH servers", 200),
        ("POST messages", 202),
        ("POST tenants", 201),
    ):
        assert seen[f"{route} {success}"] > 0, seen
        assert seen[f"{route} 422"] > 0, seen
    assert seen["POST servers 422"] == FUZZ_EXAMPLES


@pytest.mark.parametrize("name", [" ", "   ", "\u00a0", "\u3000 \t"])
def test_a_blank_tenant_name_is_refused_not_stored_empty(name: str) -> None:
    # The fuzz found it: min_length passed before the strip, and the empty name then failed
    # the response model (a 500 after the tenant was stored).
    with pytest.raises(ValidationError):
        TenantCreate(name=name)
