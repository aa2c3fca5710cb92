"""TLS for SMTP connections made to a checked IP address.

The code resolves a host once, checks the address, and connects to that address, so no second
DNS answer can redirect it. The certificate must still be verified against the host name the
tenant typed: this context pins that name for SNI and hostname verification whatever address
the socket was opened to.
"""

from __future__ import annotations

import ssl
from typing import Any

import aiosmtplib


class PinnedHostnameContext(ssl.SSLContext):
    pinned_hostname: str

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        kwargs["server_hostname"] = self.pinned_hostname
        if len(args) > 3:
            args = args[:3]
        return super().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self.pinned_hostname
        return super().wrap_socket(*args, **kwargs)


def pinned_context(hostname: str) -> ssl.SSLContext:
    """A verifying client context (system trust store, honours SSL_CERT_FILE) for `hostname`."""
    context = PinnedHostnameContext(ssl.PROTOCOL_TLS_CLIENT)
    context.pinned_hostname = hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_default_certs()
    return context


def smtp_client(
    address: str, host: str, port: int, *, implicit_tls: bool, timeout: float
) -> aiosmtplib.SMTP:
    """A client for `host` that dials the checked `address`; STARTTLS is the caller's step."""
    return aiosmtplib.SMTP(
        hostname=address,
        port=port,
        use_tls=implicit_tls,
        start_tls=False,
        tls_context=pinned_context(host),
        timeout=timeout,
    )
