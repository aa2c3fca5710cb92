"""Provider detection beyond the SMTP host: the rules over the host's CNAME chain and the
account domain's MX (a table and hypothesis properties), then the registry asking a real DNS
server on loopback (dnslib) at the check, storing what it found, and the scheduler keeping the
stored provider's limits."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.registry.provider_dns import worth_asking
from shared import addresses
from shared.providers import PROVIDERS, account_domain, detect, is_consumer_microsoft
from shared.settings import Settings
from tests.conftest import Api, make_settings, running
from tests.support.dns import DnsTestServer, Zone, dns_server
from tests.support.smtp import Certificates, SmtpTestServer, smtp_server
from tests.test_scheduler_api import dispatcher, emails, published_jobs, warm_up


def key(host: str, username: str = "", **answers: Any) -> str | None:
    provider = detect(host, username, **answers)
    return provider.key if provider else None


@pytest.mark.parametrize(
    ("host", "username", "answers", "expected"),
    [
        # The CNAME chain of a custom host name.
        ("mail.acme.com", "a@acme.com", {"cnames": ["smtp.office365.com"]}, "office365"),
        (
            "mail.acme.com",
            "a@acme.com",
            {"cnames": ["x.acme.net", "smtp.gmail.com"]},
            "google_workspace",
        ),
        ("mail.acme.com", "a@gmail.com", {"cnames": ["smtp.gmail.com."]}, "gmail"),
        ("mail.acme.com", "a@acme.com", {"cnames": ["smtp.zoho.eu"]}, "zoho"),
        ("mail.acme.com", "a@acme.com", {"cnames": ["smtp.gmail.com.evil.example"]}, None),
        # The MX of the account's domain.
        (
            "mail.acme.com",
            "a@acme.com",
            {"mx": ["acme-com.mail.protection.outlook.com"]},
            "office365",
        ),
        ("mail.acme.com", "a@acme.com", {"mx": ["ASPMX.L.GOOGLE.COM."]}, "google_workspace"),
        ("mail.acme.com", "a@acme.com", {"mx": ["aspmx2.googlemail.com"]}, "google_workspace"),
        ("mail.acme.com", "a@gmail.com", {"mx": ["gmail-smtp-in.l.google.com"]}, "gmail"),
        ("mail.acme.com", "a@acme.com", {"mx": ["mx.zoho.com"]}, "zoho"),
        ("mail.acme.com", "a@acme.com", {"mx": ["mx2.zoho.in"]}, "zoho"),
        ("mail.acme.com", "a@yahoo.com", {"mx": ["mta5.am0.yahoodns.net"]}, "yahoo"),
        ("mail.acme.com", "a@acme.com", {"mx": ["mx01.mail.icloud.com"]}, "icloud"),
        ("mail.acme.com", "a@acme.com", {"mx": ["in1-smtp.messagingengine.com"]}, "fastmail"),
        (
            "mail.acme.com",
            "a@hotmail.com",
            {"mx": ["hotmail-com.olc.protection.outlook.com"]},
            "outlook",
        ),
        ("mail.acme.com", "a@acme.com", {"mx": ["mx.acme.com"]}, None),
        ("mail.acme.com", "a@acme.com", {"mx": ["mail.protection.outlook.com.evil.example"]}, None),
        ("mail.acme.com", "a@acme.com", {"mx": ["notgoogle.com"]}, None),
        # The first MX that names a provider, in preference order.
        (
            "mail.acme.com",
            "a@acme.com",
            {"mx": ["filter.acme.com", "aspmx.l.google.com"]},
            "google_workspace",
        ),
        # A plain login: the sender address's domain is the account's.
        (
            "mail.acme.com",
            "sales",
            {"from_email": "sales@acme.com", "mx": ["aspmx.l.google.com"]},
            "google_workspace",
        ),
        (
            "mail.acme.com",
            "sales",
            {"from_email": "me@gmail.com", "mx": ["aspmx.l.google.com"]},
            "gmail",
        ),
        # The host decides before its chain, the chain before the MX.
        (
            "smtp.gmail.com",
            "a@acme.com",
            {"cnames": ["smtp.office365.com"], "mx": ["x.mail.protection.outlook.com"]},
            "google_workspace",
        ),
        (
            "mail.acme.com",
            "a@acme.com",
            {"cnames": ["smtp.gmail.com"], "mx": ["x.mail.protection.outlook.com"]},
            "google_workspace",
        ),
        (
            "mail.acme.com",
            "a@acme.com",
            {"cnames": ["relay.acme.net"], "mx": ["x.mail.protection.outlook.com"]},
            "office365",
        ),
        # Outlook.com's own domains on Microsoft 365's host are Outlook.com (no DNS needed).
        ("smtp.office365.com", "me@outlook.com", {}, "outlook"),
        ("smtp.office365.com", "me@Hotmail.co.uk", {}, "outlook"),
        ("smtp.office365.com", "me@hotmail.fr", {}, "outlook"),
        ("smtp.office365.com", "me@live.com", {}, "outlook"),
        ("smtp.office365.com", "me@msn.com", {}, "outlook"),
        ("smtp.office365.com", "me@outlook.acme.com", {}, "office365"),
        ("smtp.office365.com", "me@acme.com", {}, "office365"),
        ("mail.acme.com", "me@outlook.com", {"cnames": ["smtp.office365.com"]}, "outlook"),
        ("localhost", "a@acme.com", {}, None),
    ],
)
def test_provider_from_cname_chain_and_mx(
    host: str, username: str, answers: dict[str, Any], expected: str | None
) -> None:
    assert key(host, username, **answers) == expected


# A host name label, as DNS allows it.
LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
DNS_NAMES = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
PROVIDER_NAMES = st.sampled_from(
    [
        "smtp.office365.com",
        "smtp.gmail.com",
        "smtp.zoho.com",
        "aspmx.l.google.com",
        "acme.mail.protection.outlook.com",
        "mx.zoho.eu",
        "mta6.am0.yahoodns.net",
        "mx02.mail.icloud.com",
        "in2-smtp.messagingengine.com",
    ]
)
ANY_NAMES = st.lists(st.one_of(DNS_NAMES, PROVIDER_NAMES), max_size=4)
USERNAMES = st.one_of(
    st.just("sales"),
    st.builds(lambda domain: f"me@{domain}", st.one_of(DNS_NAMES, st.just("outlook.com"))),
)


@given(
    host=st.sampled_from(["smtp.gmail.com", "smtp.office365.com", "smtp.mail.yahoo.com"]),
    username=USERNAMES,
    cnames=ANY_NAMES,
    mx=ANY_NAMES,
)
def test_a_known_host_is_never_overruled_by_dns(
    host: str, username: str, cnames: list[str], mx: list[str]
) -> None:
    assert key(host, username, cnames=cnames, mx=mx) == key(host, username)


@given(username=USERNAMES, name=PROVIDER_NAMES, tail=DNS_NAMES)
def test_a_provider_name_under_another_domain_names_no_provider(
    username: str, name: str, tail: str
) -> None:
    # Whoever controls attacker.example can publish any name under it: only names that end in
    # the provider's own domain count.
    lookalike = f"{name}.{tail}.attacker.example"
    assert key("mail.acme.example", username, cnames=[lookalike], mx=[lookalike]) is None


@given(username=USERNAMES, cnames=ANY_NAMES, mx=ANY_NAMES)
def test_case_and_final_dot_do_not_matter(username: str, cnames: list[str], mx: list[str]) -> None:
    found = key("mail.acme.example", username, cnames=cnames, mx=mx)
    assert found is None or found in PROVIDERS
    shouted = key(
        "MAIL.ACME.EXAMPLE.",
        username.upper(),
        cnames=[f"{name.upper()}." for name in cnames],
        mx=[f"{name.upper()}." for name in mx],
    )
    assert shouted == found


@pytest.mark.parametrize(
    ("domain", "consumer"),
    [
        ("outlook.com", True),
        ("hotmail.com", True),
        ("hotmail.co.uk", True),
        ("live.com", True),
        ("live.fr", True),
        ("msn.com", True),
        ("outlook.com.br", True),
        ("acme.com", False),
        ("outlook.acme.com", False),
        ("hotmail.com.evil.example", False),
        ("msn.co", False),
    ],
)
def test_consumer_microsoft_domains(domain: str, consumer: bool) -> None:
    assert is_consumer_microsoft(domain) is consumer


def test_account_domain_is_the_logins_else_the_senders() -> None:
    assert account_domain("Sales@ACME.com", "x@other.com") == "acme.com"
    assert account_domain("sales", "x@other.com") == "other.com"
    assert account_domain("sales", "") == ""
    assert account_domain("@acme.com", "") == ""


@pytest.mark.parametrize(
    ("name", "asked"),
    [
        ("mail.acme.com", True),
        ("Mail.Acme.com.", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("203.0.113.5", False),
        ("localhost", False),
        ("smtp.localhost", False),
        ("mailhost", False),
        ("[127.0.0.1]", False),
        ("", False),
    ],
)
def test_which_names_are_worth_asking_dns(name: str, asked: bool) -> None:
    assert worth_asking(name) is asked


def test_nameservers_setting_takes_ips_with_optional_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ABL_DNS_NAMESERVERS", "127.0.0.1, 127.0.0.2:5353,[::1]:53")
    settings = make_settings("sqlite:///unused.db")
    assert settings.dns_nameservers == ("127.0.0.1", "127.0.0.2:5353", "[::1]:53")
    assert settings.dns_timeout_seconds == 2.0
    for bad in ("dns.example.com", "127.0.0.1:0", "127.0.0.1:x", "[::1]53"):
        monkeypatch.setenv("ABL_DNS_NAMESERVERS", bad)
        with pytest.raises(ValidationError, match="dns_nameservers"):
            make_settings("sqlite:///unused.db")


# --- the registry asking a real DNS server ------------------------------------------------

ACME_MX = "acme.test. 60 IN MX 10 acme-test.mail.protection.outlook.com."
ZONE = "\n".join(
    [
        ACME_MX,
        "smtp.acme.test. 60 IN CNAME relay.acme.test.",
        "relay.acme.test. 60 IN CNAME smtp.office365.com.",
    ]
)
ACCOUNTS = {
    "sales@acme.test": "sales-app-password",
    "ops@plain.test": "ops-app-password",
    "me@outlook.com": "consumer-app-password",
}
# The custom names the test server answers under; the verifier resolves them to loopback.
LOOPBACK_NAMES = ("mail.acme.test", "smtp.acme.test", "smtp.office365.com")


@pytest.fixture
def dns() -> Iterator[DnsTestServer]:
    with dns_server(Zone(ZONE)) as server:
        yield server


@pytest.fixture(scope="module")
def acme_smtp(certs: Certificates) -> Iterator[SmtpTestServer]:
    with smtp_server(certs, ACCOUNTS, security="starttls", names=LOOPBACK_NAMES) as server:
        yield server


@pytest.fixture(autouse=True)
def names_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check dials these names at the test SMTP server, as DNS would send it there: the
    connection, TLS (the certificate names them) and AUTH are real."""
    original = addresses.resolve

    async def resolve(host: str, port: int) -> list[addresses.IPAddress]:
        if host in LOOPBACK_NAMES:
            return [ipaddress.ip_address("127.0.0.1")]
        return await original(host, port)

    monkeypatch.setattr(addresses, "resolve", resolve)


def dns_settings(database_url: str, dns: DnsTestServer, **extra: Any) -> Settings:
    return make_settings(
        database_url, dns_nameservers=(dns.nameserver,), dns_timeout_seconds=0.5, **extra
    )


def body(smtp: SmtpTestServer, host: str, login: str, **extra: Any) -> dict[str, Any]:
    return {
        "host": host,
        "port": smtp.port,
        "security": "starttls",
        "username": login,
        "password": ACCOUNTS[login],
        "from_email": login,
        **extra,
    }


async def add(api: Api, tenant: dict[str, str], payload: dict[str, Any]) -> dict[str, Any]:
    response = await api.client.post("/v1/servers", json=payload, headers=tenant)
    assert response.status_code == 201, response.text
    server: dict[str, Any] = response.json()
    return server


async def test_microsoft_365_by_mx_gets_its_cap_and_30_a_minute(
    database_url: str, dns: DnsTestServer, acme_smtp: SmtpTestServer
) -> None:
    async with running(dns_settings(database_url, dns), combined=True) as app:
        tenant = await app.new_tenant()
        server = await add(app, tenant, body(acme_smtp, "mail.acme.test", "sales@acme.test"))
        assert (server["provider"], server["daily_cap"]) == ("office365", 10_000)
        assert ("acme.test", "MX") in dns.zone.asked
        fetched = await app.client.get(f"/v1/servers/{server['id']}", headers=tenant)
        assert fetched.json()["provider"] == "office365"

        # The scheduler reads the stored provider: the host alone names none.
        assert detect("mail.acme.test", "sales@acme.test") is None
        await warm_up(app, [server["id"]], step=30)
        await app.client.post("/v1/messages", json=emails(100), headers=tenant)
        start = datetime.now(UTC)
        for second in range(0, 61):
            await dispatcher(app).tick(start + timedelta(seconds=second))
        # One slot every 2 s: 31 ticks at 0, 2, ..., 60 s; at most 30 in any 60 s.
        assert len(published_jobs(app)) == 31
        warmup = await app.client.get(f"/v1/servers/{server['id']}/warmup", headers=tenant)
        assert (
            warmup.json()["provider"],
            warmup.json()["daily_limit"],
            warmup.json()["per_minute_limit"],
        ) == ("office365", 10_000, 30)
        # The senders hold the same per-minute limit.
        credentials = await app.client.get(
            f"/internal/v1/servers/{server['id']}/credentials", headers=app.internal()
        )
        assert credentials.json()["per_minute"] == 30


async def test_cname_chain_names_the_provider(
    sqlite_url: str, dns: DnsTestServer, acme_smtp: SmtpTestServer
) -> None:
    async with running(dns_settings(sqlite_url, dns)) as api:
        tenant = await api.new_tenant()
        # plain.test has no MX (NXDOMAIN): the chain smtp → relay → smtp.office365.com tells.
        server = await add(api, tenant, body(acme_smtp, "smtp.acme.test", "ops@plain.test"))
    assert (server["provider"], server["daily_cap"]) == ("office365", 10_000)
    assert ("relay.acme.test", "CNAME") in dns.zone.asked
    assert ("smtp.office365.com", "CNAME") not in dns.zone.asked  # known: the chain ends


async def test_a_given_daily_cap_is_kept(
    sqlite_url: str, dns: DnsTestServer, acme_smtp: SmtpTestServer
) -> None:
    async with running(dns_settings(sqlite_url, dns)) as api:
        tenant = await api.new_tenant()
        payload = body(acme_smtp, "mail.acme.test", "sales@acme.test", daily_cap=700)
        server = await add(api, tenant, payload)
    assert (server["provider"], server["daily_cap"]) == ("office365", 700)


async def test_unanswered_dns_stores_the_server_without_provider_in_time(
    sqlite_url: str,
    dns: DnsTestServer,
    acme_smtp: SmtpTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns.zone.text = None  # every query dropped
    settings = dns_settings(sqlite_url, dns)
    async with running(settings) as api:
        tenant = await api.new_tenant()
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="abl.registry.provider_dns"):
            server = await add(api, tenant, body(acme_smtp, "mail.acme.test", "sales@acme.test"))
        elapsed = time.monotonic() - started
    assert (server["provider"], server["daily_cap"], server["status"]) == (None, 500, "active")
    assert dns.zone.asked, "the DNS server was asked, and did not answer"
    # The lookups run beside the check and give up at ABL_DNS_TIMEOUT_SECONDS.
    assert elapsed < settings.verify_timeout_seconds
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "MX lookup of acme.test timed out" in logged
    assert "sales@" not in logged
    assert ACCOUNTS["sales@acme.test"] not in logged


async def test_a_recheck_updates_the_provider_and_keeps_it_when_dns_is_down(
    sqlite_url: str, dns: DnsTestServer, acme_smtp: SmtpTestServer
) -> None:
    async with running(dns_settings(sqlite_url, dns)) as api:
        tenant = await api.new_tenant()
        server = await add(api, tenant, body(acme_smtp, "mail.acme.test", "sales@acme.test"))
        assert server["provider"] == "office365"

        async def recheck() -> dict[str, Any]:
            response = await api.client.post(f"/v1/servers/{server['id']}/verify", headers=tenant)
            assert response.status_code == 200, response.text
            checked: dict[str, Any] = response.json()
            assert checked["last_check"]["ok"] is True
            return checked

        # The domain moved to Google Workspace.
        dns.zone.text = ZONE.replace(ACME_MX, "acme.test. 60 IN MX 1 aspmx.l.google.com.")
        assert (await recheck())["provider"] == "google_workspace"
        # DNS down at the next check: the stored provider stays.
        dns.zone.text = None
        assert (await recheck())["provider"] == "google_workspace"
        # The domain answers again, with no MX at all: an unknown server now.
        dns.zone.text = ""
        moved = await recheck()
    assert moved["provider"] is None
    # The cap set at the add stays: only a server added without one follows the provider.
    assert moved["daily_cap"] == 10_000


async def test_consumer_outlook_on_office365_host_is_outlook_without_dns(
    sqlite_url: str, dns: DnsTestServer, acme_smtp: SmtpTestServer
) -> None:
    async with running(dns_settings(sqlite_url, dns)) as api:
        tenant = await api.new_tenant()
        server = await add(api, tenant, body(acme_smtp, "smtp.office365.com", "me@outlook.com"))
    assert (server["provider"], server["daily_cap"]) == ("outlook", 300)
    assert dns.zone.asked == []  # the host is known: nothing to ask


async def test_a_server_dialled_by_address_asks_no_dns(
    sqlite_url: str, dns: DnsTestServer, acme_smtp: SmtpTestServer
) -> None:
    async with running(dns_settings(sqlite_url, dns)) as api:
        tenant = await api.new_tenant()
        server = await add(api, tenant, body(acme_smtp, "127.0.0.1", "sales@acme.test"))
    assert (server["provider"], server["daily_cap"]) == (None, 500)
    assert dns.zone.asked == []
