"""A server's mailbox access (IMAP): defaults from the provider, the check, the stored form.

The IMAP password is stored like the SMTP one (AES-256-GCM, the keyring), with associated data
naming its purpose, tenant and server. The same rule holds: a stored password is only ever
sent to the endpoint it was verified against, so a PATCH that moves the IMAP endpoint needs the
IMAP password in the same request, unless the new endpoint is the provider's own IMAP host for
the verified SMTP account (the same account at the same provider).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import repository
from services.registry.models import ImapCreate, SmtpServer
from services.registry.verifier import Verifier
from shared.crypto import Keyring, associated_data
from shared.errors import FieldError, Unprocessable
from shared.imap import ImapCheck, ImapEndpoint, ImapProblem, ImapSecurity
from shared.messages import ImapCredentials
from shared.providers import PROVIDERS, detect
from shared.timeutil import utcnow

IMAP_PURPOSE = "imap-password"


def provider_imap_host(preset: str | None, smtp_host: str, smtp_username: str) -> str | None:
    provider = PROVIDERS.get(preset or "") or detect(smtp_host, smtp_username)
    return provider.imap_host if provider else None


class ImapIncomplete(Unprocessable):
    """The `imap` object lacks what a new IMAP endpoint needs (its host or its password)."""

    code = "imap_incomplete"
    default_detail = "The IMAP password is needed for a new IMAP endpoint."
    hint = (
        "Send imap.password: a stored password is only ever sent to the endpoint it was "
        "verified against."
    )
    example_errors = (
        FieldError(
            field="body.imap.password", message="required for this IMAP endpoint", type="missing"
        ),
    )


def imap_code(problem: ImapProblem) -> str:
    # Apart from the SMTP check's codes: `imap_auth_failed` is not the SMTP login failing.
    return f"imap_{problem.value}"


class ImapCheckFailed(Unprocessable):
    """The IMAP check (LOGIN, read-only SELECT of INBOX) failed: nothing was stored."""

    codes = tuple(imap_code(problem) for problem in ImapProblem)
    code = imap_code(ImapProblem.auth_failed)
    default_detail = "The mailbox could not be read: see the code."
    hint = "Check the IMAP settings and try again."


def _missing(field: str, message: str, detail: str, hint: str) -> Unprocessable:
    return ImapIncomplete(
        detail,
        hint=hint,
        errors=[FieldError(field=f"body.imap.{field}", message=message, type="missing")],
    )


def endpoint_for(
    imap: ImapCreate,
    *,
    preset: str | None,
    smtp_host: str,
    smtp_username: str,
    password: str | None,
) -> ImapEndpoint:
    host = imap.host or provider_imap_host(preset, smtp_host, smtp_username)
    if host is None:
        raise _missing(
            "host",
            "required: the SMTP host names no known provider",
            "The IMAP host is missing.",
            "Give imap.host (e.g. imap.example.com), or use a preset.",
        )
    security = imap.security or (ImapSecurity.starttls if imap.port == 143 else ImapSecurity.tls)
    port = imap.port or (993 if security is ImapSecurity.tls else 143)
    secret = imap.password.get_secret_value() if imap.password else password
    if secret is None:
        raise _missing(
            "password",
            "required for this IMAP endpoint",
            "The IMAP password is needed for a new IMAP endpoint.",
            "Send imap.password: a stored password is only ever sent to the endpoint it was "
            "verified against.",
        )
    return ImapEndpoint(host, port, security, imap.username or smtp_username, secret)


def check_failed(outcome: ImapCheck) -> Unprocessable:
    assert outcome.problem is not None
    hints = {
        "auth_failed": "Check the IMAP username and password; Gmail, Outlook and Yahoo need an "
        "app password and IMAP turned on in the mailbox settings.",
        "tls_failed": "Use port 993 with security tls, or 143 with starttls.",
        "blocked_host": "The IMAP host must be reachable on the public internet.",
        "blocked_port": "Use port 993 (tls) or 143 (starttls).",
    }
    return ImapCheckFailed(
        outcome.detail,
        code=imap_code(outcome.problem),
        hint=hints.get(outcome.problem.value, "Check the IMAP settings and try again."),
    )


async def verify(verifier: Verifier, endpoint: ImapEndpoint) -> None:
    outcome = await verifier.check_imap(endpoint)
    if not outcome.ok:
        raise check_failed(outcome)


def store(keyring: Keyring, server: SmtpServer, endpoint: ImapEndpoint) -> None:
    server.imap_host = endpoint.host
    server.imap_port = endpoint.port
    server.imap_security = endpoint.security.value
    server.imap_username = endpoint.username
    store_password(keyring, server, endpoint.password)
    server.imap_last_poll_at = None
    server.imap_last_poll_error = None


def store_password(keyring: Keyring, server: SmtpServer, password: str) -> None:
    server.imap_password_ciphertext = keyring.encrypt(
        password, associated_data(server.tenant_id, server.id, IMAP_PURPOSE)
    )


def open_password(keyring: Keyring, server: SmtpServer) -> str:
    assert server.imap_password_ciphertext is not None
    return keyring.decrypt(
        server.imap_password_ciphertext,
        associated_data(server.tenant_id, server.id, IMAP_PURPOSE),
    )


def stored_endpoint(keyring: Keyring, server: SmtpServer) -> ImapEndpoint | None:
    if server.imap_host is None or server.imap_port is None or server.imap_username is None:
        return None
    return ImapEndpoint(
        server.imap_host,
        server.imap_port,
        ImapSecurity(server.imap_security or "tls"),
        server.imap_username,
        open_password(keyring, server),
    )


async def update(
    verifier: Verifier, keyring: Keyring, server: SmtpServer, imap: ImapCreate
) -> None:
    """PATCH: check the new mailbox access, then store it."""
    stored = stored_endpoint(keyring, server)
    password = None
    if imap.password is None:
        probe = endpoint_for(
            imap,
            preset=None,
            smtp_host=server.host,
            smtp_username=server.username,
            password="",  # only the endpoint is compared here, never dialled
        )
        same = stored is not None and (probe.host, probe.port, probe.security, probe.username) == (
            stored.host,
            stored.port,
            stored.security,
            stored.username,
        )
        providers_own = (
            probe.host == provider_imap_host(None, server.host, server.username)
            and probe.username == server.username
        )
        if same and stored is not None:
            password = stored.password
        elif providers_own:
            password = repository.open_password(keyring, server)
    endpoint = endpoint_for(
        imap,
        preset=None,
        smtp_host=server.host,
        smtp_username=server.username,
        password=password,
    )
    await verify(verifier, endpoint)
    store(keyring, server, endpoint)
    server.updated_at = utcnow()


async def imap_credentials(
    session: AsyncSession, keyring: Keyring, server_id: uuid.UUID
) -> ImapCredentials | None:
    """The mailbox access of a server (any tenant), for the scheduler's mailbox reader; None
    when the server does not exist or reads no mailbox."""
    server = await session.get(SmtpServer, server_id)
    endpoint = stored_endpoint(keyring, server) if server is not None else None
    if server is None or endpoint is None:
        return None
    return ImapCredentials(
        id=server.id,
        tenant_id=server.tenant_id,
        host=endpoint.host,
        port=endpoint.port,
        security=endpoint.security.value,
        username=endpoint.username,
        password=endpoint.password,
    )


async def servers_with_mailbox(session: AsyncSession) -> list[SmtpServer]:
    query = select(SmtpServer).where(col(SmtpServer.imap_host).is_not(None))
    return list((await session.exec(query)).all())


async def record_poll(
    session: AsyncSession, server_id: uuid.UUID, at: datetime, error: str | None
) -> bool:
    """Note the mailbox reader's last read of the server's INBOX; False if no such server."""
    server = await session.get(SmtpServer, server_id)
    if server is None:
        return False
    server.imap_last_poll_at = at
    server.imap_last_poll_error = error[:512] if error else None
    session.add(server)
    return True
