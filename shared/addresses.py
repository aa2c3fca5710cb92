"""Which addresses a user-typed host may be dialled at: shared by the check and the senders.

Only globally routable unicast addresses, in any spelling, and a name is refused whole when one
of its answers is forbidden (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

# Ranges the ipaddress module does not flag on its own, or flags only on some Python versions.
_EXTRA_BLOCKED = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "192.0.0.0/24",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "64:ff9b::/96",  # NAT64: embeds an IPv4 address
        "64:ff9b:1::/48",
        "100::/64",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 spelling carries (mapped, 6to4, Teredo, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in ipaddress.ip_network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    # IPv4-compatible (deprecated) ::a.b.c.d
    if int(address) >> 32 == 0 and int(address) > 1:
        return ipaddress.IPv4Address(int(address))
    return None


def is_public_address(address: IPAddress) -> bool:
    """True when a user-typed host may be dialled: a globally routable unicast address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return is_public_address(address.ipv4_mapped)  # the same host, spelt in IPv6
    inner = embedded_ipv4(address)
    if inner is not None and not is_public_address(inner):
        return False
    if address in METADATA_ADDRESSES:
        return False
    if any(address in net for net in _EXTRA_BLOCKED if net.version == address.version):
        return False
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


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
