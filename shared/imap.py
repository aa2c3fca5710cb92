"""IMAP connections to a tenant's mailbox, under the same rules as SMTP.

The host is resolved once and every answer must pass `shared/addresses.py`; the connection goes
to the address that was checked while TLS verifies the certificate against the typed host name
(SNI and hostname pinned), so DNS rebinding cannot point a stored password elsewhere. Only
IMAPS (993, implicit TLS) and IMAP with STARTTLS (143) are dialled; LOGIN never travels in
plain text. A mailbox of an OAuth server authenticates with SASL XOAUTH2 instead (the same
`user=…\x01auth=Bearer …\x01\x01` string as SMTP), with a short-lived access token.

The standard library's `imaplib` is used, in a worker thread per mailbox: it is the best-kept
IMAP client for Python, it takes a socket timeout, and a thread per connection keeps one slow
mailbox from holding up any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import imaplib
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

from shared import addresses

DEFAULT_IMAP_PORTS = (143, 993)


class ImapSecurity(StrEnum):
    tls = "tls"
    starttls = "starttls"


class ImapAuth(StrEnum):
    password = "password"  # noqa: S105  # the method's name
    xoauth2 = "xoauth2"


@dataclass(frozen=True)
class ImapEndpoint:
    host: str
    port: int
    security: ImapSecurity
    username: str
    # The password, or with `xoauth2` the access token ("" when the grant is gone).
    password: str
    auth: ImapAuth = ImapAuth.password

    def __repr__(self) -> str:  # the secret must never reach a log or a traceback
        return (
            f"ImapEndpoint(host={self.host!r}, port={self.port}, {self.security.value}, "
            f"{self.auth.value})"
        )

    @property
    def token_sha256(self) -> str:
        """How the reader names an access token it saw refused, without sending it back."""
        return hashlib.sha256(self.password.encode()).hexdigest()


class LoginRefused(imaplib.IMAP4.error):
    """The IMAP server refused the password or the access token."""


class GrantGone(LoginRefused):
    """An OAuth server's mailbox has no access token: its grant was revoked or expired."""


def xoauth2_string(username: str, token: str) -> bytes:
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def authenticate(client: imaplib.IMAP4, endpoint: ImapEndpoint) -> None:
    """LOGIN with the password, or AUTHENTICATE XOAUTH2 with the access token. A refused token
    may first get a continuation holding a JSON error (Gmail's way): answered with an empty
    line, which brings the final NO. Either refusal raises `LoginRefused`."""
    try:
        if endpoint.auth is ImapAuth.xoauth2:
            if not endpoint.password:
                raise GrantGone("no access token: the OAuth grant is gone")
            answers = iter([xoauth2_string(endpoint.username, endpoint.password)])
            client.authenticate("XOAUTH2", lambda _challenge: next(answers, b""))
        else:
            client.login(endpoint.username, endpoint.password)
    except LoginRefused:
        raise
    except imaplib.IMAP4.abort:
        raise
    except imaplib.IMAP4.error:
        # The server's words are not repeated: they could echo what was sent.
        refused = "access token" if endpoint.auth is ImapAuth.xoauth2 else "login"
        raise LoginRefused(f"the IMAP server refused the {refused}") from None


class _PinnedImap(imaplib.IMAP4):
    """Plain IMAP to a checked address; STARTTLS verifies against the typed host name."""

    def __init__(self, address: str, host: str, port: int, timeout: float) -> None:
        self._address = address
        self._server_hostname = host
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self._address, self.port), timeout)

    def pinned_starttls(self, context: ssl.SSLContext) -> None:
        # imaplib's starttls() would verify against `self.host`; it is the typed host too, but
        # say so explicitly rather than depend on that.
        typ, _ = self._simple_command("STARTTLS")
        if typ != "OK":
            raise imaplib.IMAP4.error("STARTTLS refused")
        self.sock = context.wrap_socket(self.sock, server_hostname=self._server_hostname)
        self.file = self.sock.makefile("rb")
        self._tls_established = True
        self._get_capabilities()


class _PinnedImapSsl(imaplib.IMAP4_SSL):
    def __init__(
        self, address: str, host: str, port: int, context: ssl.SSLContext, timeout: float
    ) -> None:
        self._address = address
        super().__init__(host, port, ssl_context=context, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        raw = socket.create_connection((self._address, self.port), timeout)
        return self.ssl_context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[no-any-return]


def connect(address: str, endpoint: ImapEndpoint, timeout: float) -> imaplib.IMAP4:
    """A logged-in connection to `address` (already checked). Blocking: run it in a thread."""
    context = ssl.create_default_context()
    client: imaplib.IMAP4
    if endpoint.security is ImapSecurity.tls:
        client = _PinnedImapSsl(address, endpoint.host, endpoint.port, context, timeout)
    else:
        plain = _PinnedImap(address, endpoint.host, endpoint.port, timeout)
        try:
            plain.pinned_starttls(context)
        except BaseException:
            plain.shutdown()
            raise
        client = plain
    try:
        authenticate(client, endpoint)
    except BaseException:
        client.shutdown()
        raise
    return client


def supports_idle(client: imaplib.IMAP4) -> bool:
    return "IDLE" in client.capabilities


def idle_once(client: imaplib.IMAP4, seconds: float, stop: threading.Event) -> bool:
    """One IMAP IDLE (RFC 2177) on the selected mailbox, for up to `seconds` or until `stop`;
    True when the server announced a new message (`* n EXISTS`). Blocking. The standard
    library's imaplib has no IDLE before Python 3.14, hence the few lines of protocol here."""
    tag = client._new_tag()
    client.send(tag + b" IDLE\r\n")
    if not client.readline().startswith(b"+"):
        raise imaplib.IMAP4.error("IDLE refused")
    sock = client.socket()
    arrived = False
    deadline = time.monotonic() + seconds
    while not arrived and not stop.is_set() and time.monotonic() < deadline:
        # Wait for the server a second at a time, so that `stop` is seen soon. (A timeout on
        # the socket would leave imaplib's reader unusable.) Bytes TLS has already decrypted
        # wait in `pending()`, where select() cannot see them.
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not pending and not select.select([sock], [], [], 1.0)[0]:
            continue
        line = client.readline()
        if not line:
            raise imaplib.IMAP4.abort("the server closed the line during IDLE")
        arrived = line.startswith(b"* ") and line.rstrip().endswith(b"EXISTS")
    client.send(b"DONE\r\n")
    while not (line := client.readline()).startswith(tag):
        if not line:
            raise imaplib.IMAP4.abort("the server closed the line after IDLE")
    return arrived


class ImapProblem(StrEnum):
    auth_failed = "auth_failed"
    tls_failed = "tls_failed"
    connect_failed = "connect_failed"
    timeout = "timeout"
    dns_failed = "dns_failed"
    blocked_host = "blocked_host"
    blocked_port = "blocked_port"
    no_inbox = "no_inbox"
    protocol_error = "protocol_error"


@dataclass(frozen=True)
class ImapCheck:
    problem: ImapProblem | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.problem is None


IMAP_PASSED = ImapCheck(None, "LOGIN, SELECT INBOX and LOGOUT passed.")
XOAUTH2_PASSED = ImapCheck(None, "AUTHENTICATE XOAUTH2, SELECT INBOX and LOGOUT passed.")


async def checked_address(
    endpoint: ImapEndpoint, *, allow_private: bool, allowed_ports: tuple[int, ...]
) -> str | ImapCheck:
    """The address to dial, or why none may be."""
    if not allow_private and endpoint.port not in allowed_ports:
        return ImapCheck(ImapProblem.blocked_port, "Only IMAP ports 993 and 143 may be used.")
    try:
        allowed = await addresses.checked_addresses(
            endpoint.host, endpoint.port, allow_private=allow_private
        )
    except addresses.ForbiddenAddress:
        return ImapCheck(ImapProblem.blocked_host, "The IMAP host is not a public address.")
    except (socket.gaierror, UnicodeError):
        return ImapCheck(ImapProblem.dns_failed, "The IMAP host name does not resolve.")
    return str(allowed[0])


def _check_blocking(address: str, endpoint: ImapEndpoint, timeout: float) -> ImapCheck:
    try:
        client = connect(address, endpoint, timeout)
    except LoginRefused:
        refused = "access token" if endpoint.auth is ImapAuth.xoauth2 else "credentials"
        return ImapCheck(ImapProblem.auth_failed, f"The IMAP server refused the {refused}.")
    except imaplib.IMAP4.error as exc:
        if "STARTTLS" in str(exc):
            return ImapCheck(ImapProblem.tls_failed, "The server did not offer STARTTLS.")
        return ImapCheck(ImapProblem.protocol_error, "The IMAP server broke off the session.")
    except ssl.SSLError as exc:
        reason = getattr(exc, "verify_message", None) or exc.reason or type(exc).__name__
        return ImapCheck(ImapProblem.tls_failed, f"TLS failed: {reason}.")
    except TimeoutError:
        return ImapCheck(ImapProblem.timeout, "The IMAP server did not answer in time.")
    except OSError:
        return ImapCheck(ImapProblem.connect_failed, "Could not connect to the IMAP server.")
    try:
        # EXAMINE (read-only SELECT): the check must change nothing, not even \Recent.
        typ, _ = client.select("INBOX", readonly=True)
        if typ != "OK":
            return ImapCheck(ImapProblem.no_inbox, "The mailbox has no INBOX to read.")
        return XOAUTH2_PASSED if endpoint.auth is ImapAuth.xoauth2 else IMAP_PASSED
    except (imaplib.IMAP4.error, OSError):
        return ImapCheck(ImapProblem.protocol_error, "The IMAP server broke off the session.")
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


async def check(
    endpoint: ImapEndpoint,
    *,
    allow_private: bool,
    allowed_ports: tuple[int, ...] = DEFAULT_IMAP_PORTS,
    bound_seconds: float = 10.0,
) -> ImapCheck:
    """LOGIN, SELECT INBOX (read-only), LOGOUT; bounded by `bound_seconds` as a whole."""
    target = await checked_address(
        endpoint, allow_private=allow_private, allowed_ports=allowed_ports
    )
    if isinstance(target, ImapCheck):
        return target
    try:
        async with asyncio.timeout(bound_seconds):
            return await asyncio.to_thread(_check_blocking, target, endpoint, bound_seconds * 0.9)
    except TimeoutError:
        return ImapCheck(ImapProblem.timeout, "The IMAP server did not answer in time.")
