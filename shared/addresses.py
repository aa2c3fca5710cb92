"""Which addresses a user-typed host may be dialled at: shared by the check and the senders.

Only globally routable unicast addresses: every spelling that embeds an IPv4 address (mapped,
IPv4-compatible, 6to4, Teredo, NAT64) is refused whole, as is every special-purpose block, and a
name is refused whole when one of its answers is forbidden (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The one table of what may never be dialled, whatever `ipaddress.is_global` says on this
# Python version (its own list lags the registries: 3.11 passes 192.88.99.0/24, 3fff::/20 and
# the deprecated fec0::/10). It holds every block of the IANA IPv4 and IPv6 special-purpose
# registries, the globally reachable ones included (anycast infrastructure, AS112, AMT, ORCHID:
# no tenant's SMTP server lives there), and the blocks the registries leave to other documents.
# tests/data holds the registries; a test checks every block of them against this table.
DENIED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(block), name)
    for block, name in (
        # IANA IPv4 special-purpose registry
        ("0.0.0.0/8", "this network"),
        ("10.0.0.0/8", "private use"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT; Alibaba's metadata)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link local (cloud metadata at 169.254.169.254)"),
        ("172.16.0.0/12", "private use"),
        ("192.0.0.0/24", "IETF protocol assignments (PCP and TURN anycast included)"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.31.196.0/24", "AS112"),
        ("192.52.193.0/24", "AMT"),
        ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
        ("192.168.0.0/16", "private use"),
        ("192.175.48.0/24", "AS112 direct delegation"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("240.0.0.0/4", "reserved, and the limited broadcast 255.255.255.255"),
        # IPv4 beyond that registry
        ("224.0.0.0/4", "multicast"),
        # IANA IPv6 special-purpose registry
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::ffff:0:0/96", "IPv4-mapped: type the IPv4 address itself"),
        ("64:ff9b::/96", "NAT64 well-known prefix: embeds an IPv4 address"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard only"),
        ("100:0:0:1::/64", "dummy prefix"),
        ("2001::/23", "IETF protocol assignments (Teredo, anycast, AMT, AS112, ORCHID, DETs)"),
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4: embeds an IPv4 address"),
        ("2620:4f:8000::/48", "AS112 direct delegation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing (SRv6) SIDs"),
        ("fc00::/7", "unique local (AWS metadata at fd00:ec2::254)"),
        ("fe80::/10", "link local"),
        # IPv6 beyond that registry
        ("::/96", "IPv4-compatible (deprecated, RFC 4291)"),
        ("fec0::/10", "site local (deprecated, RFC 3879)"),
        ("ff00::/8", "multicast"),
    )
)
# Global unicast is allocated from 2000::/3 only (RFC 4291 section 2.4); the rest is reserved.
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def denied_by(address: IPAddress) -> str | None:
    """Why `address` may not be dialled, or None when it may."""
    for network, name in DENIED_NETWORKS:
        if network.version == address.version and address in network:
            return name
    if isinstance(address, ipaddress.IPv6Address) and address not in _IPV6_GLOBAL_UNICAST:
        return "outside 2000::/3, the IPv6 global unicast space"
    if not address.is_global or address.is_reserved:
        return "not globally reachable"
    return None


def is_public_address(address: IPAddress) -> bool:
    """True when a user-typed host may be dialled: a globally routable unicast address."""
    return denied_by(address) is None


@dataclass(frozen=True)
class AddressVerdict:
    allowed: tuple[IPAddress, ...]
    refused: tuple[IPAddress, ...]

    @property
    def ok(self) -> bool:
        # One private answer among public ones is a DNS-rebinding sign: refuse the name whole.
        return bool(self.allowed) and not self.refused


def judge_addresses(addresses: Iterable[IPAddress], *, allow_private: bool) -> AddressVerdict:
    unique = tuple(dict.fromkeys(addresses))
    if allow_private:
        return AddressVerdict(allowed=unique, refused=())
    allowed = tuple(a for a in unique if is_public_address(a))
    refused = tuple(a for a in unique if not is_public_address(a))
    return AddressVerdict(allowed=allowed, refused=refused)


async def resolve(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


class ForbiddenAddress(Exception):
    """The host resolves to an address that may not be dialled (or one answer among several)."""


async def checked_addresses(host: str, port: int, *, allow_private: bool) -> tuple[IPAddress, ...]:
    """Resolve `host` once and return the addresses that may be dialled, in order.

    Raises ForbiddenAddress when any answer is forbidden, socket.gaierror when none resolves.
    """
    verdict = judge_addresses(await resolve(host, port), allow_private=allow_private)
    if not verdict.ok:
        raise ForbiddenAddress(host)
    return verdict.allowed
