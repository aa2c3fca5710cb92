"""The registry's rules, free of I/O: presets, which ports may be dialled, what a failed check
means to a person, and the per-tenant budget of checks. Which addresses may be dialled is in
`shared.addresses`, because the senders apply the same rule."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class Security(StrEnum):
    starttls = "starttls"
    tls = "tls"


class ServerStatus(StrEnum):
    active = "active"
    paused = "paused"
    # Paused by the bounce-rate guard: its hard bounces (or complaints) crossed the threshold.
    paused_bounces = "paused_bounces"
    auth_failed = "auth_failed"
    tls_failed = "tls_failed"
    connect_failed = "connect_failed"
    timeout = "timeout"
    blocked_host = "blocked_host"
    protocol_error = "protocol_error"


class AuthMethod(StrEnum):
    password = "password"  # noqa: S105  # AUTH PLAIN or LOGIN with the stored password
    xoauth2 = "xoauth2"  # SASL XOAUTH2 with an access token from the OAuth provider


class CheckCode(StrEnum):
    auth_failed = "auth_failed"
    auth_unsupported = "auth_unsupported"
    tls_failed = "tls_failed"
    connect_failed = "connect_failed"
    timeout = "timeout"
    blocked_host = "blocked_host"
    blocked_port = "blocked_port"
    dns_failed = "dns_failed"
    protocol_error = "protocol_error"


@dataclass(frozen=True)
class Preset:
    host: str
    port: int
    security: Security
    note: str


PRESETS: dict[str, Preset] = {
    "gmail": Preset(
        "smtp.gmail.com", 587, Security.starttls, "Needs 2-Step Verification and an app password."
    ),
    "google_workspace": Preset(
        "smtp.gmail.com", 587, Security.starttls, "Needs 2-Step Verification and an app password."
    ),
    "outlook": Preset(
        "smtp-mail.outlook.com", 587, Security.starttls, "Outlook.com personal accounts."
    ),
    "office365": Preset(
        "smtp.office365.com",
        587,
        Security.starttls,
        "SMTP AUTH must be enabled for the mailbox in Microsoft 365.",
    ),
    "zoho": Preset(
        "smtp.zoho.com",
        587,
        Security.starttls,
        "Paid Zoho Mail organisations use smtppro.zoho.com.",
    ),
    "yahoo": Preset("smtp.mail.yahoo.com", 465, Security.tls, "Needs an app password."),
    "icloud": Preset("smtp.mail.me.com", 587, Security.starttls, "Needs an app-specific password."),
    "fastmail": Preset("smtp.fastmail.com", 465, Security.tls, "Needs an app password."),
}

GMAIL_HOSTS = frozenset({"smtp.gmail.com", "smtp-relay.gmail.com"})


def port_allowed(port: int, allowed_ports: Iterable[int], *, allow_private: bool) -> bool:
    return allow_private or port in set(allowed_ports)


@dataclass(frozen=True)
class CheckOutcome:
    """What a connection check found, in terms the API reports."""

    code: CheckCode | None
    detail: str
    hint: str | None = None
    reply: str | None = None

    @property
    def ok(self) -> bool:
        return self.code is None


PASSED = CheckOutcome(code=None, detail="Connected, TLS verified and authenticated.")


def auth_failure(host: str, reply_code: int, reply: str) -> CheckOutcome:
    text = f"{reply_code} {reply}".strip()
    if host in GMAIL_HOSTS or ("5.7.8" in reply and "gsmtp" in reply.lower()):
        hint = (
            "Gmail refused the password. Turn on 2-Step Verification for the Google account, "
            "create an app password (Google Account → Security → App passwords) and use that "
            "16-character password here, not the account password."
        )
    elif microsoft_basic_auth_refused(reply_code, reply):
        hint = MICROSOFT_OAUTH_HINT
    else:
        hint = "Check the username and password; many providers require an app password."
    return CheckOutcome(CheckCode.auth_failed, "The server refused the credentials.", hint, text)


MICROSOFT_OAUTH_HINT = (
    "Microsoft 365 refuses passwords for SMTP on this mailbox (SMTP AUTH with basic "
    "authentication is off, as Microsoft now sets it by default). Connect the mailbox with "
    "Microsoft instead, no password needed: POST /v1/servers/oauth/microsoft/start (or "
    "`ablctl servers connect microsoft`), with this server's id as `server_id` to keep it."
)
OAUTH_RECONNECT_HINT = (
    "{title} no longer accepts this connection (consent revoked, password changed or the "
    "grant expired): reconnect this account with POST /v1/servers/oauth/{provider}/start and "
    "this server's id as `server_id` (or `ablctl servers connect {provider} --server-id ...`)."
)


def microsoft_basic_auth_refused(reply_code: int | None, reply: str) -> bool:
    """`535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled` or
    `550 5.7.30 Basic authentication is not supported for Client Submission`: Microsoft 365
    refuses passwords for this mailbox; only OAuth works."""
    return (
        "5.7.139" in reply
        or "5.7.30" in reply
        or "SmtpClientAuthentication" in reply
        or (reply_code in (535, 550) and "basic authentication" in reply.lower())
    )


def status_hint(
    code: str | None, reply: str | None, auth: AuthMethod, provider: str | None
) -> str | None:
    """What a person can do about a server's last failure, as `GET /v1/servers/{id}` shows."""
    if code != CheckCode.auth_failed:
        return None
    if auth is AuthMethod.xoauth2 and provider:
        title = {"google": "Google", "microsoft": "Microsoft"}.get(provider, provider)
        return OAUTH_RECONNECT_HINT.format(title=title, provider=provider)
    if reply and microsoft_basic_auth_refused(None, reply):
        return MICROSOFT_OAUTH_HINT
    return "Check the password (many providers require an app password), then verify again."


def tls_failure(port: int, security: Security, reason: str) -> CheckOutcome:
    if security is Security.tls and port != 465:
        hint = (
            f"Port {port} usually speaks plain SMTP first: choose security 'starttls', "
            "or use port 465 with 'tls'."
        )
    elif security is Security.starttls and port == 465:
        hint = "Port 465 expects TLS from the first byte: choose security 'tls'."
    else:
        hint = (
            "The TLS handshake failed: check that the host name matches the server's "
            "certificate and that the certificate is issued by a trusted authority."
        )
    return CheckOutcome(CheckCode.tls_failed, f"TLS could not be set up: {reason}", hint)


def starttls_missing() -> CheckOutcome:
    return CheckOutcome(
        CheckCode.tls_failed,
        "The server does not offer STARTTLS, and credentials are never sent in plain text.",
        "Use port 465 with security 'tls' if the server supports it.",
    )


def auth_missing() -> CheckOutcome:
    return CheckOutcome(
        CheckCode.auth_unsupported,
        "The server does not offer authentication (no AUTH in its EHLO reply).",
        "Use the provider's submission port (587 or 465), which accepts AUTH.",
    )


def xoauth2_missing() -> CheckOutcome:
    return CheckOutcome(
        CheckCode.auth_unsupported,
        "The server does not offer XOAUTH2 (OAuth) authentication.",
        "Check ABL_OAUTH_<PROVIDER>_SMTP_HOST and _SMTP_PORT: they must name the provider's "
        "submission server.",
    )


def timed_out(seconds: float, port: int, security: Security, stage: str) -> CheckOutcome:
    if stage == "greeting" and security is Security.starttls and port == 465:
        return tls_failure(port, security, "no plain-text greeting on a TLS port")
    hint = "Check the host and port, and that the server is reachable from the internet."
    if stage == "greeting" and security is Security.starttls:
        hint += " If this port expects TLS from the first byte (as 465 does), choose 'tls'."
    return CheckOutcome(
        CheckCode.timeout,
        f"The server did not answer within {seconds:g} s (while waiting for the {stage}).",
        hint,
    )


def connect_failed() -> CheckOutcome:
    # Refused, unreachable and filtered look the same so the check cannot map a network.
    return CheckOutcome(
        CheckCode.connect_failed,
        "Could not connect to the server.",
        "Check the host and port; the provider's documentation gives its SMTP submission port.",
    )


def dns_failed() -> CheckOutcome:
    # The host is not repeated: no error echoes the caller's input.
    return CheckOutcome(
        CheckCode.dns_failed,
        "The host name does not resolve.",
        "Check the spelling of the host name.",
    )


def blocked_host() -> CheckOutcome:
    return CheckOutcome(
        CheckCode.blocked_host,
        "This host resolves to an address that may not be used (private, loopback, "
        "link-local, shared or metadata).",
        "Use the public host name of the SMTP server.",
    )


def blocked_port(port: int, allowed: Iterable[int]) -> CheckOutcome:
    ports = ", ".join(str(p) for p in sorted(allowed))
    return CheckOutcome(
        CheckCode.blocked_port,
        f"Port {port} is not an SMTP submission port.",
        f"Use one of: {ports}.",
    )


def protocol_error(reply_code: int, reply: str) -> CheckOutcome:
    return CheckOutcome(
        CheckCode.protocol_error,
        "The server answered in a way that is not a usable SMTP session.",
        "Check that the host and port are those of an SMTP server.",
        f"{reply_code} {reply}".strip(),
    )


# Statuses only the tenant's own resume ends: a check, a sender's report, a refused OAuth refresh
# or the bounce-rate guard records what it found but leaves the status as it is.
KEPT_STATUSES = frozenset({ServerStatus.paused})


def settled_status(current: ServerStatus, found: ServerStatus) -> ServerStatus:
    """The status a server takes when something other than resume finds it `found`: a pause
    by hand wins."""
    return current if current in KEPT_STATUSES else found


def unchanged_by(found: ServerStatus) -> frozenset[ServerStatus]:
    """The statuses `settled_status` leaves as they are when a server is found `found`: the
    guard of a conditional UPDATE, so that of concurrent writers one changes the status."""
    return KEPT_STATUSES | {found}


def status_after_check(outcome: CheckOutcome) -> ServerStatus:
    if outcome.ok:
        return ServerStatus.active
    mapping = {
        CheckCode.auth_failed: ServerStatus.auth_failed,
        CheckCode.auth_unsupported: ServerStatus.auth_failed,
        CheckCode.tls_failed: ServerStatus.tls_failed,
        CheckCode.timeout: ServerStatus.timeout,
        CheckCode.blocked_host: ServerStatus.blocked_host,
        CheckCode.blocked_port: ServerStatus.blocked_host,
    }
    assert outcome.code is not None
    return mapping.get(outcome.code, ServerStatus.connect_failed)


@dataclass
class TokenBucket:
    """Checks a tenant may still start: `rate` per second, up to `burst` at once."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    updated: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> float:
        """Take one token at `now` (monotonic seconds); return 0 or the seconds to wait."""
        elapsed = max(0.0, now - self.updated) if self.updated else 0.0
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate
