"""The check dials only public addresses: the address matrix is refused with no connection made."""

from __future__ import annotations

import ipaddress
from typing import Any

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import addresses
from tests.conftest import Api, make_settings, running

FORBIDDEN_HOSTS = [
    "127.0.0.1",
    "localhost",
    "[::1]",
    "::1",
    "::ffff:127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "169.254.169.254",
    "10.0.0.1",
    "100.64.0.1",
    "fc00::1",
    "0.0.0.0",  # noqa: S104 - a host a tenant might type, not a bind address
    "224.0.0.1",
    "192.168.1.10",
    "172.16.0.1",
    "fe80::1",
    "64:ff9b::a00:1",
    "2002:a00:1::1",
    "intranet.corp.example",
]


@pytest.fixture
def spy_connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every SMTP connection the verifier opens, and a private DNS answer for one name."""
    opened: list[str] = []
    original_connect = aiosmtplib.SMTP.connect
    original_resolve = addresses.resolve

    async def connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(self.hostname))
        return await original_connect(self, *args, **kwargs)

    async def resolve(host: str, port: int) -> list[addresses.IPAddress]:
        if host == "intranet.corp.example":  # stands in for a DNS name pointing inside
            return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.1.2.3")]
        return await original_resolve(host, port)

    monkeypatch.setattr(aiosmtplib.SMTP, "connect", connect)
    monkeypatch.setattr(addresses, "resolve", resolve)
    return opened


@pytest.mark.parametrize("host", FORBIDDEN_HOSTS)
async def test_forbidden_address_is_refused_without_connecting(
    database_url: str, host: str, spy_connections: list[str]
) -> None:
    settings = make_settings(database_url, allow_private_hosts=False)
    async with running(settings) as api:
        tenant = await api.new_tenant()
        body = {
            "host": host.strip("[]"),
            "port": 587,
            "security": "starttls",
            "username": "a@example.net",
            "password": "x",
            "from_email": "a@example.net",
        }
        response = await api.client.post("/v1/servers", json=body, headers=tenant)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "blocked_host", response.json()
    assert spy_connections == []


async def test_port_outside_the_submission_ports_is_refused(
    api: Api, spy_connections: list[str]
) -> None:
    settings = make_settings(api.settings.database_url, allow_private_hosts=False)
    async with running(settings) as strict:
        tenant = await strict.new_tenant()
        body = {
            "host": "93.184.216.34",
            "port": 22,
            "security": "starttls",
            "username": "a@example.net",
            "password": "x",
            "from_email": "a@example.net",
        }
        response = await strict.client.post("/v1/servers", json=body, headers=tenant)
    assert response.json()["code"] == "blocked_port"
    assert "587" in response.json()["hint"]
    assert spy_connections == []


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2607:f8b0:4004:c07::6c", True),
        ("127.0.0.1", False),
        ("10.255.255.255", False),
        ("100.64.0.1", False),
        ("100.127.255.254", False),
        ("169.254.169.254", False),
        ("224.0.0.251", False),
        ("255.255.255.255", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::7f00:1", False),
        ("2002:7f00:1::", False),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo to 10.0.0.1
        ("fd00:ec2::254", False),
        ("ff02::1", False),
        ("::", False),
    ],
)
def test_is_public_address_table(address: str, public: bool) -> None:
    assert addresses.is_public_address(ipaddress.ip_address(address)) is public


@given(st.ip_addresses(v=4))
def test_ipv4_mapped_spelling_never_changes_the_verdict(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert addresses.is_public_address(mapped) == addresses.is_public_address(address)


@given(st.lists(st.ip_addresses(), min_size=1, max_size=6))
def test_one_forbidden_answer_refuses_the_whole_name(
    answers: list[addresses.IPAddress],
) -> None:
    verdict = addresses.judge_addresses(answers, allow_private=False)
    assert verdict.ok == all(addresses.is_public_address(a) for a in answers)
    assert addresses.judge_addresses(answers, allow_private=True).ok
