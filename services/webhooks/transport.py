"""The HTTP client webhooks are posted with: it dials only addresses the SSRF rules allow.

The URL was checked when it was registered, but a name may resolve elsewhere later (DNS
rebinding). So every new connection resolves the host through `checked_addresses` (the table of
server checks) and connects to an allowed address itself; TLS still verifies the certificate
against the host name. Redirects are never followed (one could point inside the network), and
no proxy from the environment is used.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

import httpcore
import httpx

from shared import addresses


class BlockedAddress(httpcore.ConnectError):
    """The host resolves to an address the SSRF rules refuse."""


class GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            allowed = await addresses.checked_addresses(
                host, port, allow_private=self.allow_private
            )
        except addresses.ForbiddenAddress as exc:
            raise BlockedAddress("blocked_host") from exc
        except socket.gaierror as exc:
            raise httpcore.ConnectError("dns_failed") from exc
        last: Exception | None = None
        for address in allowed:
            try:
                return await self.inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                last = exc
        raise httpcore.ConnectError("connect_failed") from last

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def guarded_client(*, allow_private: bool, timeout: float, connections: int) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx does not take a network backend; its pool does. Same settings as httpx's own pool,
    # with the guarded backend.
    transport._pool = httpcore.AsyncConnectionPool(
        # SSL_CERT_FILE is honoured, as for server checks.
        ssl_context=httpx.create_ssl_context(),
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=30.0,
        network_backend=GuardedBackend(allow_private=allow_private),
    )
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": "ABillionLeads-Webhooks/1"},
    )
