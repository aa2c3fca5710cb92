"""A server's mailbox access (IMAP): defaults from the provider, the check, the stored form.

The IMAP password is stored like the SMTP one (AES-256-GCM, the keyring), with associated data
naming its purpose, tenant and server. The same rule holds: a stored password is only ever
sent to the endpoint it was verified against, so a PATCH that moves the IMAP endpoint needs the
IMAP password in the same request, unless the new endpoint is the provider's own IMAP host for
the verified SMTP account (the same account at the same provider).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from datetime import datetime

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import repository
from services.registry.domain import AuthMethod, ServerStatus
from services.registry.models import ImapCreate, OAuthImap, SmtpServer
from services.registry.oauth.providers import Provider as OAuthProvider
from services.registry.oauth.tokens import AccessToken, TokenKeeper
from services.registry.verifier import Verifier
from shared.crypto import Keyring, associated_data
from shared.errors import FieldError, Unprocessable
from shared.imap import ImapAuth, ImapCheck, ImapEndpoint, ImapProblem, ImapSecurity
from shared.messages import ImapCredentials, PollReputation
from shared.providers import PROVIDERS, detect
from shared.timeutil import utcnow

IMAP_PURPOSE = "imap-password"

logger = logging.getLogger("abl.registry.mailbox")


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
        "app password and IMAP turned on in the mailbox settings. A server connected with "
        "OAuth: turn IMAP on in the mailbox, or reconnect it to grant mailbox access.",
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
    if endpoint.auth is ImapAuth.xoauth2:
        server.imap_password_ciphertext = None  # the access token is never stored here
    else:
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


def reads_with_grant(server: SmtpServer) -> bool:
    return server.auth == AuthMethod.xoauth2 and server.imap_password_ciphertext is None


def stored_endpoint(keyring: Keyring, server: SmtpServer) -> ImapEndpoint | None:
    """The stored mailbox access; one read with the grant gets its access token per use."""
    if server.imap_host is None or server.imap_port is None or server.imap_username is None:
        return None
    grant = reads_with_grant(server)
    if server.imap_password_ciphertext is None and not grant:
        return None
    return ImapEndpoint(
        server.imap_host,
        server.imap_port,
        ImapSecurity(server.imap_security or "tls"),
        server.imap_username,
        "" if grant else open_password(keyring, server),
        ImapAuth.xoauth2 if grant else ImapAuth.password,
    )


def _keeper(verifier: Verifier) -> TokenKeeper:
    assert verifier.tokens is not None, "the registry builds its verifier with the TokenKeeper"
    return verifier.tokens


def grant_endpoint(
    provider: OAuthProvider | None,
    account: str,
    imap: ImapCreate | OAuthImap,
) -> ImapEndpoint:
    """An OAuth server's own mailbox, read with its grant: the provider's IMAP server (a port
    and security may be given), the grant's account. Another host or account needs a password:
    the access token goes to the provider only. The token itself is added for each use."""
    host = imap.host if isinstance(imap, ImapCreate) else None
    username = imap.username if isinstance(imap, ImapCreate) else None
    if provider is None or (host or provider.imap_host) != provider.imap_host:
        raise _missing(
            "password",
            "required for an IMAP host other than the OAuth provider's",
            "The IMAP password is needed for this IMAP endpoint.",
            "Leave imap.host out to read the mailbox with the server's OAuth grant, or send "
            "imap.password: the access token is only ever sent to the provider's IMAP server.",
        )
    if (username or account) != account:
        raise _missing(
            "password",
            "required for an account other than the OAuth grant's",
            "The IMAP password is needed for another account.",
            "Leave imap.username out to read the connected mailbox with its OAuth grant.",
        )
    security = imap.security or ImapSecurity.tls
    port = imap.port or (provider.imap_port if security is ImapSecurity.tls else 143)
    return ImapEndpoint(provider.imap_host, port, security, account, "", ImapAuth.xoauth2)


async def grant_token(
    tokens: TokenKeeper, server: SmtpServer, rejected: str | None = None
) -> AccessToken | None:
    """The access token to read the mailbox with; None when the grant is gone. A server whose
    grant was found gone (`auth_failed`) is not refreshed again on every read: its stored token
    only, until the tenant reconnects it."""
    if ServerStatus(server.status) is ServerStatus.auth_failed:
        return tokens.current(server, rejected)
    return await tokens.token(server, rejected)


async def verify_with_grant(verifier: Verifier, server: SmtpServer, endpoint: ImapEndpoint) -> None:
    # The token kept for sending, when it has time left: no refresh (nor its transaction) in
    # the middle of the caller's.
    tokens = _keeper(verifier)
    token = tokens.current(server) or await grant_token(tokens, server)
    if token is None:
        raise ImapCheckFailed(
            "The server's OAuth grant is gone: its mailbox cannot be read.",
            code=imap_code(ImapProblem.auth_failed),
            hint="Reconnect the server with OAuth (POST /v1/oauth/{provider}/start with its "
            "server_id), then add the imap object again.",
        )
    await verify(verifier, replace(endpoint, password=token.value))


async def update(
    verifier: Verifier, keyring: Keyring, server: SmtpServer, imap: ImapCreate
) -> None:
    """PATCH: check the new mailbox access, then store it."""
    if imap.password is None and server.auth == AuthMethod.xoauth2:
        provider = _keeper(verifier).providers.get(server.oauth_provider or "")
        endpoint = grant_endpoint(provider, server.username, imap)
        await verify_with_grant(verifier, server, endpoint)
        store(keyring, server, endpoint)
        server.updated_at = utcnow()
        return
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
    session: AsyncSession,
    keyring: Keyring,
    tokens: TokenKeeper,
    server_id: uuid.UUID,
    *,
    rejected_token: str | None = None,
) -> ImapCredentials | None:
    """The mailbox access of a server (any tenant), for the scheduler's mailbox reader; None
    when the server does not exist or reads no mailbox, or when a mailbox read with the grant
    names a host other than its provider's IMAP server.

    A mailbox read with the OAuth grant gets a short-lived access token (null when the grant
    is gone); `rejected_token` (its SHA-256) names one the IMAP server refused: a new one is
    fetched unless another caller already did. Raises `TokenUnavailable`."""
    server = await session.get(SmtpServer, server_id)
    endpoint = stored_endpoint(keyring, server) if server is not None else None
    if server is None or endpoint is None:
        return None
    token = None
    if endpoint.auth is ImapAuth.xoauth2:
        provider = tokens.providers.get(server.oauth_provider or "")
        if provider is None or endpoint.host != provider.imap_host:
            # The access token only ever goes to its provider's IMAP server: a stored host
            # that is not (any more) the provider's gets no token.
            logger.warning(
                "server %s: its mailbox %s is not the IMAP server of its OAuth provider %s",
                server.id,
                endpoint.host,
                server.oauth_provider,
            )
            return None
        # The read is over: end its transaction before a refresh may wait for the row's lock.
        await session.commit()
        token = await grant_token(tokens, server, rejected_token)
    return ImapCredentials(
        id=server.id,
        tenant_id=server.tenant_id,
        host=endpoint.host,
        port=endpoint.port,
        security=endpoint.security.value,
        username=endpoint.username,
        auth=endpoint.auth.value,
        password=endpoint.password,
        access_token=token.value if token else None,
        access_token_expires_at=token.expires_at if token else None,
    )


async def servers_with_mailbox(session: AsyncSession) -> list[SmtpServer]:
    query = select(SmtpServer).where(col(SmtpServer.imap_host).is_not(None))
    return list((await session.exec(query)).all())


async def record_poll(
    session: AsyncSession,
    server_id: uuid.UUID,
    at: datetime,
    error: str | None,
    reputation: PollReputation | None = None,
) -> bool:
    """Note the mailbox reader's last read of the server's INBOX, and the bounce and complaint
    rates it sent with it (a report without them, from an older reader, keeps the stored
    ones); False if no such server."""
    server = await session.get(SmtpServer, server_id)
    if server is None:
        return False
    server.imap_last_poll_at = at
    server.imap_last_poll_error = error[:512] if error else None
    if reputation is not None:
        server.reputation_sample = reputation.sample
        server.reputation_bounce_rate = reputation.bounce_rate
        server.reputation_complaint_rate = reputation.complaint_rate
        server.reputation_at = at
    session.add(server)
    return True
