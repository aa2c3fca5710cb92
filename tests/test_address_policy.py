"""The check dials only public addresses: the address matrix is refused with no connection made."""

from __future__ import annotations

import csv
import ipaddress
from pathlib import Path
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
        # IPv4-mapped is a special-purpose block of its own: the IPv4 address is to be typed.
        ("::ffff:8.8.8.8", False),
        ("::8.8.8.8", False),  # IPv4-compatible, deprecated
        ("2002:808:808::1", False),  # 6to4, even of a public IPv4 address
        ("fec0::1", False),  # site local, deprecated
        ("3fff::1", False),  # documentation, RFC 9637
        ("192.88.99.1", False),  # 6to4 relay anycast, deprecated
        ("4000::1", False),  # outside 2000::/3
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
def test_no_ipv6_spelling_of_an_ipv4_address_is_dialled(address: ipaddress.IPv4Address) -> None:
    spellings = [
        ipaddress.IPv6Address(f"::ffff:{address}"),  # mapped
        ipaddress.IPv6Address(f"::{address}"),  # compatible
        ipaddress.IPv6Address(f"64:ff9b::{address}"),  # NAT64
        ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80) | 1),  # 6to4
        ipaddress.IPv6Address((0x20010000 << 96) | (int(address) ^ 0xFFFFFFFF)),  # Teredo
    ]
    assert not any(addresses.is_public_address(spelling) for spelling in spellings)


@given(st.lists(st.ip_addresses(), min_size=1, max_size=6))
def test_one_forbidden_answer_refuses_the_whole_name(
    answers: list[addresses.IPAddress],
) -> None:
    verdict = addresses.judge_addresses(answers, allow_private=False)
    assert verdict.ok == all(addresses.is_public_address(a) for a in answers)
    assert addresses.judge_addresses(answers, allow_private=True).ok


# The IANA IPv4 and IPv6 special-purpose address registries, kept as data in the repo
# (tests/data/README.md says where they come from), and the blocks the product refuses beyond
# them. Every block is tried at its first, middle and last address.
DATA = Path(__file__).resolve().parent / "data"
REGISTRY_FILES = ("iana-ipv4-special-registry.csv", "iana-ipv6-special-registry.csv")
BEYOND_THE_REGISTRIES = [
    "224.0.0.0/4",  # multicast (its own registry)
    "ff00::/8",  # multicast
    "fec0::/10",  # site local, deprecated by RFC 3879 and dropped from the registry
    "::/96",  # IPv4-compatible, deprecated by RFC 4291
    "4000::/3",  # reserved by the IETF: not global unicast
    "8000::/1",
]


def registry_blocks() -> list[tuple[str, str]]:
    blocks = []
    for name in REGISTRY_FILES:
        with (DATA / name).open(newline="") as handle:
            for row in csv.DictReader(handle):
                # A cell may list several blocks separated by commas, as IANA writes them.
                for block in row["Address Block"].split(","):
                    blocks.append((block.strip(), row["Name"]))
    return blocks


REGISTRY_BLOCKS = registry_blocks()


def samples(block: str) -> list[addresses.IPAddress]:
    network = ipaddress.ip_network(block)
    middle = network.network_address + network.num_addresses // 2
    return [network.network_address, middle, network.broadcast_address]


def test_the_registries_are_complete() -> None:
    v4 = [b for b, _ in REGISTRY_BLOCKS if ":" not in b]
    v6 = [b for b, _ in REGISTRY_BLOCKS if ":" in b]
    assert (len(v4), len(v6)) == (25, 25)
    for block in ("192.88.99.0/24", "3fff::/20", "100:0:0:1::/64", "5f00::/16", "2001:30::/28"):
        assert block in v4 + v6


@pytest.mark.parametrize(
    "block",
    [b for b, _ in REGISTRY_BLOCKS] + BEYOND_THE_REGISTRIES,
)
def test_every_special_purpose_block_is_refused(block: str) -> None:
    for address in samples(block):
        assert addresses.denied_by(address) is not None, address
        assert not addresses.judge_addresses([address], allow_private=False).ok


@given(st.ip_addresses())
def test_only_global_unicast_outside_every_block_is_dialled(address: addresses.IPAddress) -> None:
    in_a_block = any(
        address in ipaddress.ip_network(block)
        for block in [b for b, _ in REGISTRY_BLOCKS] + BEYOND_THE_REGISTRIES
        if ipaddress.ip_network(block).version == address.version
    )
    if in_a_block:
        assert not addresses.is_public_address(address)
    else:
        # Outside every block, the verdict is ipaddress's own.
        assert addresses.is_public_address(address) == (
            address.is_global and not address.is_reserved
        )


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2607:f8b0:4004:c07::6c"])
def test_a_public_address_passes_the_table(address: str) -> None:
    # The table is not refusing everything: an ordinary public address is dialled.
    assert addresses.denied_by(ipaddress.ip_address(address)) is None


async def test_each_registry_block_is_refused_through_the_api(
    sqlite_url: str, spy_connections: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name resolves to an address of each block in turn: 422 blocked_host, nothing dialled."""
    answer: list[addresses.IPAddress] = []

    async def resolve(host: str, port: int) -> list[addresses.IPAddress]:
        return list(answer)

    monkeypatch.setattr(addresses, "resolve", resolve)
    settings = make_settings(sqlite_url, allow_private_hosts=False)
    refused = 0
    async with running(settings) as api:
        tenant = await api.new_tenant()
        for block in [b for b, _ in REGISTRY_BLOCKS] + BEYOND_THE_REGISTRIES:
            answer[:] = [samples(block)[1]]
            body = {
                "host": "smtp.example.com",
                "port": 587,
                "security": "starttls",
                "username": "a@example.net",
                "password": "x",
                "from_email": "a@example.net",
            }
            response = await api.client.post("/v1/servers", json=body, headers=tenant)
            assert response.status_code == 422, (block, response.text)
            assert response.json()["code"] == "blocked_host", block
            refused += 1
    assert refused == len(REGISTRY_BLOCKS) + len(BEYOND_THE_REGISTRIES)
    assert spy_connections == []
