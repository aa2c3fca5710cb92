"""Connecting a mailbox with OAuth: the start (authorization URL, PKCE, state) and the
callback (code exchange, address, XOAUTH2 check, store).

The `state` is `{flow id}.{tenant id}.{expiry}.{MAC}`: signed with a key derived from the
encryption keyring, short-lived, bound to the tenant that started the flow, and single use (the
flow's row is claimed by one atomic UPDATE before anything else happens). The PKCE verifier
stays in the row, encrypted; it never reaches the browser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import mailbox, repository
from services.registry.domain import AuthMethod, CheckCode, CheckOutcome
from services.registry.models import OAuthFlow, OAuthImap, OAuthStart, SmtpServer
from services.registry.oauth.client import OAuthClient, OAuthFailure, address_from_claims
from services.registry.oauth.providers import Provider
from services.registry.oauth.tokens import store_tokens
from services.registry.verifier import Target, Verifier
from shared.crypto import Keyring, associated_data
from shared.errors import AppError, Conflict, NotFound
from shared.imap import ImapEndpoint, ImapProblem, ImapSecurity
from shared.metrics import OAUTH_CONNECTS
from shared.providers import detect
from shared.timeutil import utcnow

logger = logging.getLogger("abl.registry.oauth")

VERIFIER_PURPOSE = "oauth-pkce"
# Finished flows are kept this long after they expire (ablctl reads their outcome), then purged.
KEEP_FINISHED = timedelta(days=1)
_ERROR_CODE = re.compile(r"^[a-z0-9_]{1,40}$")
# The errors the callback reports, for the frontend to switch on (`?error=`), besides the
# connection check's codes.
CALLBACK_ERRORS = (
    "access_denied",
    "bad_state",
    "state_used",
    "state_expired",
    "missing_code",
    "invalid_grant",
    "invalid_id_token",
    "provider_unavailable",
    "provider_error",
    "no_email",
    "no_refresh_token",
    "account_mismatch",
    "server_exists",
    "server_not_found",
    "oauth_provider_not_configured",
    "internal_error",
)
_OUTCOMES = frozenset(
    {
        "connected",
        *CALLBACK_ERRORS,
        *(code.value for code in CheckCode),
        *(mailbox.imap_code(problem) for problem in ImapProblem),
    }
)


def record_outcome(provider: str | None, outcome: str) -> None:
    """Count a callback's outcome. The error code may come from the provider's redirect (or
    whoever forged it), so only documented codes become label values."""
    OAUTH_CONNECTS.labels(provider or "unknown", outcome if outcome in _OUTCOMES else "other").inc()


class FlowError(Exception):
    """The callback cannot complete; `code` lands on the frontend URL as `?error=`."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code if _ERROR_CODE.match(code) else "provider_error"


def _state_keys(keyring: Keyring) -> list[bytes]:
    # One MAC key per encryption key, so a state signed just before a key rotation still opens.
    return [hmac.new(key, b"abl/oauth-state/v1", hashlib.sha256).digest() for key in keyring.keys]


def _mac(key: bytes, payload: str) -> str:
    digest = hmac.new(key, payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign_state(keyring: Keyring, flow: OAuthFlow) -> str:
    payload = f"{flow.id.hex}.{flow.tenant_id.hex}.{int(flow.expires_at.timestamp())}"
    return f"{payload}.{_mac(_state_keys(keyring)[0], payload)}"


@dataclass(frozen=True)
class StateClaims:
    flow_id: uuid.UUID
    tenant_id: uuid.UUID
    expires_at: int


def open_state(keyring: Keyring, state: str) -> StateClaims:
    """The state's claims if its MAC is one of ours; FlowError(`bad_state`) otherwise."""
    try:
        flow_hex, tenant_hex, expiry, mac = state.split(".")
        claims = StateClaims(uuid.UUID(hex=flow_hex), uuid.UUID(hex=tenant_hex), int(expiry))
    except ValueError:
        raise FlowError("bad_state") from None
    payload = f"{flow_hex}.{tenant_hex}.{expiry}"
    if not any(hmac.compare_digest(_mac(key, payload), mac) for key in _state_keys(keyring)):
        raise FlowError("bad_state")
    return claims


class OAuthProviderNotConfigured(NotFound):
    """Connecting with this provider is not available on this platform."""

    code = "oauth_provider_not_configured"
    # The name comes from the URL: the caller's input, never repeated.
    default_detail = "Connecting with this provider is not available on this platform."
    hint = (
        "Providers configured here: google. An operator enables one with "
        "ABL_OAUTH_<PROVIDER>_CLIENT_ID and _CLIENT_SECRET (see the README)."
    )


def provider_missing(configured: dict[str, Provider]) -> AppError:
    offered = ", ".join(sorted(configured)) or "none"
    return OAuthProviderNotConfigured(
        hint=f"Providers configured here: {offered}. An operator enables one with "
        f"ABL_OAUTH_<PROVIDER>_CLIENT_ID and _CLIENT_SECRET (see the README).",
    )


async def start(
    session: AsyncSession,
    keyring: Keyring,
    client: OAuthClient,
    provider: Provider,
    tenant_id: uuid.UUID,
    body: OAuthStart,
    ttl_seconds: float,
) -> tuple[str, str, datetime]:
    """A new flow: (authorize URL, state, expiry)."""
    if body.server_id is not None:
        # 404 for another tenant's server, exactly as for one that does not exist.
        await repository.get_server(session, tenant_id, body.server_id)
    now = utcnow()
    await session.exec(delete(OAuthFlow).where(col(OAuthFlow.expires_at) < now - KEEP_FINISHED))
    # RFC 7636: 43 to 128 characters from the unreserved set; 64 random bytes give 86.
    verifier = secrets.token_urlsafe(64)
    flow = OAuthFlow(
        tenant_id=tenant_id,
        provider=provider.name,
        verifier_ciphertext="",
        server_id=body.server_id,
        label=body.label,
        from_name=body.from_name,
        daily_cap=body.daily_cap,
        read_mailbox=body.imap is not None,
        imap_port=body.imap.port if body.imap else None,
        imap_security=body.imap.security.value if body.imap and body.imap.security else None,
        expires_at=now + timedelta(seconds=ttl_seconds),
    )
    flow.verifier_ciphertext = keyring.encrypt(
        verifier, associated_data(tenant_id, flow.id, VERIFIER_PURPOSE)
    )
    session.add(flow)
    state = sign_state(keyring, flow)
    return client.authorization_url(provider, state, verifier), state, flow.expires_at


async def claim(
    sessions: async_sessionmaker[AsyncSession], keyring: Keyring, state: str
) -> tuple[OAuthFlow, str]:
    """Use the state: its flow and PKCE verifier. One atomic UPDATE decides, so a replayed (or
    concurrently repeated) callback finds the flow used and is refused."""
    claims = open_state(keyring, state)
    now = utcnow()
    async with sessions() as session, session.begin():
        claimed = await session.exec(
            update(OAuthFlow)
            .where(
                col(OAuthFlow.id) == claims.flow_id,
                col(OAuthFlow.tenant_id) == claims.tenant_id,
                col(OAuthFlow.used_at).is_(None),
                col(OAuthFlow.expires_at) > now,
            )
            .values(used_at=now)
        )
        flow = await session.get(OAuthFlow, claims.flow_id)
        if flow is None or flow.tenant_id != claims.tenant_id:
            raise FlowError("bad_state")
        if claimed.rowcount != 1:
            raise FlowError("state_used" if flow.used_at is not None else "state_expired")
    verifier = keyring.decrypt(
        flow.verifier_ciphertext, associated_data(flow.tenant_id, flow.id, VERIFIER_PURPOSE)
    )
    return flow, verifier


async def finish(
    sessions: async_sessionmaker[AsyncSession],
    flow_id: uuid.UUID,
    *,
    server_id: uuid.UUID | None = None,
    error: str | None = None,
) -> None:
    async with sessions() as session, session.begin():
        flow = await session.get(OAuthFlow, flow_id)
        if flow is not None:
            flow.result_server_id = server_id
            flow.result_error = error
            session.add(flow)


async def complete(
    sessions: async_sessionmaker[AsyncSession],
    keyring: Keyring,
    client: OAuthClient,
    verifier: Verifier,
    provider: Provider,
    flow: OAuthFlow,
    code: str,
    code_verifier: str,
) -> uuid.UUID:
    """Exchange the code, find the address, check the server (and the mailbox, when the start
    asked for it) with XOAUTH2, store it."""
    try:
        tokens = await client.exchange(provider, code, code_verifier)
        address = address_from_claims(tokens.claims) or await client.userinfo_address(
            provider, tokens.access_token
        )
    except OAuthFailure as exc:
        raise FlowError(exc.code) from None
    if address is None:
        raise FlowError("no_email")
    if not tokens.refresh_token:
        raise FlowError("no_refresh_token")
    outcome: CheckOutcome = await verifier.check(
        Target(
            provider.smtp_host,
            provider.smtp_port,
            provider.security,
            address,
            tokens.access_token,
            AuthMethod.xoauth2,
        )
    )
    if not outcome.ok:
        assert outcome.code is not None
        logger.info("oauth connect refused by the SMTP check: %s", outcome.code.value)
        raise FlowError(outcome.code.value)
    imap_endpoint = None
    if flow.read_mailbox:
        imap_endpoint = mailbox.grant_endpoint(
            provider,
            address,
            OAuthImap(
                port=flow.imap_port,
                security=ImapSecurity(flow.imap_security) if flow.imap_security else None,
            ),
        )
        checked = await verifier.check_imap(replace(imap_endpoint, password=tokens.access_token))
        if checked.problem is not None:
            logger.info("oauth connect refused by the IMAP check: %s", checked.problem.value)
            raise FlowError(mailbox.imap_code(checked.problem))

    async with sessions() as session, session.begin():
        server = await _target_server(session, flow, provider, address)
        if server is None:
            server = SmtpServer(
                tenant_id=flow.tenant_id,
                label=flow.label or address,
                host=provider.smtp_host,
                port=provider.smtp_port,
                security=provider.security,
                username=address,
                from_email=address,
                from_name=flow.from_name,
                daily_cap=flow.daily_cap,
                password_ciphertext="",
            )
        else:
            # A reconnect keeps the server's id, warmup and settings; a label or sender name
            # given with the reconnect replaces the old one.
            server.label = flow.label or server.label
            server.from_name = flow.from_name or server.from_name
            server.host, server.port = provider.smtp_host, provider.smtp_port
            server.security = provider.security
        server.auth = AuthMethod.xoauth2
        server.oauth_provider = provider.name
        # The provider's own SMTP host names it (no DNS needed); the account's domain tells
        # Workspace from Gmail and Outlook.com from Microsoft 365.
        mailbox_provider = detect(server.host, address)
        server.provider = mailbox_provider.key if mailbox_provider else None
        server.password_ciphertext = ""
        server.refresh_token_ciphertext = repository.seal_token(
            keyring, server, repository.REFRESH_TOKEN, tokens.refresh_token
        )
        store_tokens(keyring, server, tokens.access_token, tokens.expires_at)
        if imap_endpoint is None and mailbox.reads_with_grant(server):
            # A reconnect, perhaps under another provider, of a server that reads its mailbox
            # with the grant: the new token must go to the new provider's IMAP server only.
            imap_endpoint = _grant_mailbox_for(provider, server)
        if imap_endpoint is not None:
            mailbox.store(keyring, server, imap_endpoint)
        server.record_check(outcome, utcnow())
        session.add(server)
        try:
            await repository.flush_unique(session)
        except Conflict:
            raise FlowError("server_exists") from None
        return server.id


def _grant_mailbox_for(provider: Provider, server: SmtpServer) -> ImapEndpoint | None:
    """The mailbox a server read with its grant, at `provider`: kept as it was under the same
    IMAP host, else the provider's own IMAP server with its defaults."""
    if server.imap_host is None:
        return None
    kept = server.imap_host == provider.imap_host
    return mailbox.grant_endpoint(
        provider,
        server.username,
        OAuthImap(
            port=server.imap_port if kept else None,
            security=ImapSecurity(server.imap_security) if kept and server.imap_security else None,
        ),
    )


async def _target_server(
    session: AsyncSession, flow: OAuthFlow, provider: Provider, address: str
) -> SmtpServer | None:
    """The server this connection updates: the one named at the start (which must be this
    mailbox), or the tenant's OAuth server for this mailbox; None for a new one."""
    if flow.server_id is not None:
        server = await session.get(SmtpServer, flow.server_id)
        if server is None or server.tenant_id != flow.tenant_id:
            raise FlowError("server_not_found")
        if server.username != address:
            # Another mailbox must not take over this server's id, history and warmup.
            raise FlowError("account_mismatch")
        return server
    query = select(SmtpServer).where(
        SmtpServer.tenant_id == flow.tenant_id,
        SmtpServer.host == provider.smtp_host,
        SmtpServer.username == address,
    )
    existing = (await session.exec(query)).first()
    if existing is None:
        return None
    if existing.auth != AuthMethod.xoauth2:
        raise FlowError("server_exists")  # a password server: convert it with server_id
    return existing
