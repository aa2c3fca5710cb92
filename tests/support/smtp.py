"""A real SMTP server for tests: aiosmtpd with STARTTLS or implicit TLS, and AUTH.

Certificates come from trustme; the tests point SSL_CERT_FILE at its CA, so the code under test
verifies certificates exactly as it does against a public provider.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Certificates:
    ca: trustme.CA
    ca_file: str

    def server_context(self, names: tuple[str, ...] = ()) -> ssl.SSLContext:
        """`names`: more host names the certificate holds, for a test that dials the server
        under another name (mapped to loopback)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert = self.ca.issue_cert("localhost", "127.0.0.1", "::1", "smtp.test", *names)
        cert.configure_cert(context)
        return context


@dataclass
class Recorder:
    """What the server saw: logins, messages per account, connections."""

    accounts: dict[str, str]
    data_delay: float = 0.0
    # A hostile server: takes any login, as one set up to harvest passwords would.
    accept_any: bool = False
    # Every AUTH attempt, with the password it carried, successful or not.
    auth_attempts: list[tuple[str, str]] = field(default_factory=list)
    connections: int = 0
    logins: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    # When each message was taken (time.monotonic()), in order: what a provider counts.
    accepted_at: list[float] = field(default_factory=list)
    messages: list[Envelope] = field(default_factory=list)
    basic_auth_off: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def authenticate(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        with self.lock:
            self.auth_attempts.append((login, password))
        if login in self.basic_auth_off:
            # Microsoft 365 with basic authentication turned off for the mailbox.
            return AuthResult(success=False, handled=False, message=BASIC_AUTH_OFF)
        ok = self.accept_any or self.accounts.get(login) == password
        if ok:
            with self.lock:
                self.logins[login] += 1
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)

    async def handle_MAIL(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # An account whose login starts with "quota" has used up its day at the provider.
        if str(session.auth_data).startswith("quota"):
            return "550 5.4.5 Daily user sending quota exceeded."
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTPProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        script = address.partition("@")[0].partition("+")[0]
        if script in RCPT_REPLIES:
            return RCPT_REPLIES[script]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTPProtocol, session: Session, envelope: Envelope) -> str:
        script = envelope.rcpt_tos[0].partition("@")[0].partition("+")[0]
        if script == "data451":
            return "451 4.4.1 Temporary local problem"
        if script == "hang":
            await asyncio.sleep(HANG_SECONDS)
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self.lock:
            self.accepted[str(session.auth_data)] += 1
            self.accepted_at.append(time.monotonic())
            self.messages.append(envelope)
        if script == "dropafter":
            # The message is taken, but the line dies before the reply: maybe delivered.
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
        return "250 2.0.0 OK queued"


# Recipients script the server: `<script>+anything@domain`.
RCPT_REPLIES = {
    "rcpt550": "550 5.1.1 The email account that you tried to reach does not exist",
    "rcpt451": "451 4.2.1 Mailbox busy, come back in a while",
    "quota": "550 5.4.5 Daily user sending quota exceeded.",
    "msquota": "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
}
HANG_SECONDS = 30.0
BASIC_AUTH_OFF = "550 5.7.30 Basic authentication is not supported for Client Submission."


class ScriptedSMTP(SMTPProtocol):
    """Drops the line when DATA is asked for a `dropbefore` recipient: before the final '.'."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        recorder = self.event_handler
        if isinstance(recorder, Recorder):
            with recorder.lock:
                recorder.connections += 1
        super().connection_made(transport)

    async def smtp_DATA(self, arg: str) -> None:
        assert self.envelope is not None
        if any(rcpt.startswith("dropbefore") for rcpt in self.envelope.rcpt_tos):
            assert isinstance(self.transport, asyncio.Transport)
            self.transport.abort()
            return
        await super().smtp_DATA(arg)


class ScriptedController(Controller):
    def factory(self) -> SMTPProtocol:
        return ScriptedSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class SmtpTestServer:
    host: str
    port: int
    security: str
    recorder: Recorder
    controller: Controller


@contextmanager
def smtp_server(
    certs: Certificates,
    accounts: dict[str, str],
    *,
    security: str = "starttls",
    data_delay: float = 0.0,
    accept_any: bool = False,
    recorder: Recorder | None = None,
    exclude_auth: tuple[str, ...] = (),
    names: tuple[str, ...] = (),
) -> Iterator[SmtpTestServer]:
    """`recorder` replaces the password one (e.g. an XOAUTH2 one); `exclude_auth` withdraws
    mechanisms from the EHLO answer; `names` are more host names its certificate holds."""
    recorder = recorder or Recorder(
        accounts=dict(accounts), data_delay=data_delay, accept_any=accept_any
    )
    port = free_port()
    context = certs.server_context(names)
    kwargs: dict[str, Any] = {
        "authenticator": recorder.authenticate,
        "auth_required": True,
        "auth_require_tls": True,
        "hostname": "127.0.0.1",
        "port": port,
        "server_hostname": "smtp.test",
        "auth_exclude_mechanism": list(exclude_auth),
    }
    if security == "tls":
        kwargs["ssl_context"] = context
        # aiosmtpd only counts STARTTLS as TLS; on an implicit-TLS port every byte is already
        # encrypted, so AUTH is safe to offer.
        kwargs["auth_require_tls"] = False
    else:
        kwargs["tls_context"] = context
        kwargs["require_starttls"] = True
    controller = ScriptedController(recorder, **kwargs)
    controller.start()
    try:
        yield SmtpTestServer("127.0.0.1", port, security, recorder, controller)
    finally:
        controller.stop()


@contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def closed_port() -> int:
    return free_port()


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A port whose TCP handshake gets no answer, as behind a dropping firewall.

    A listener that never accepts, with its one-slot backlog filled: Linux then drops SYNs.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
