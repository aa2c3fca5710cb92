"""A tenant's SMTP servers. Only a server that passes the connection check is stored."""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from typing import Annotated

from fastapi import APIRouter, Body, Response, status
from fastapi.openapi.models import Example
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import domain, mailbox, repository
from services.registry.deps import KeyringDep, LimiterDep, TokenKeeperDep, VerifierDep
from services.registry.domain import (
    AuthMethod,
    CheckCode,
    CheckOutcome,
    Security,
    ServerStatus,
    status_hint,
)
from services.registry.models import (
    CONNECTION_FIELDS,
    ENDPOINT_FIELDS,
    SmtpServer,
    SmtpServerCreate,
    SmtpServerPage,
    SmtpServerPublic,
    SmtpServerUpdate,
)
from services.registry.oauth.tokens import TokenKeeper, TokenUnavailable, token_digest
from services.registry.verifier import Target, Verifier
from shared.db import SessionDep
from shared.errors import FieldError, Unprocessable, raises
from shared.metrics import SERVER_VERIFICATION_DURATION, SERVER_VERIFICATIONS
from shared.pagination import (
    CursorQuery,
    InvalidCursor,
    Limit200Query,
    decode_cursor,
    encode_cursor,
)
from shared.registry_read import ServerNotFound
from shared.spec import example_response
from shared.tenancy import TenantDep
from shared.timeutil import utcnow

router = APIRouter(prefix="/v1/servers", tags=["servers"])

GMAIL_SERVER = {
    "preset": "gmail",
    "username": "sales@acme.com",
    "password": "abcd efgh ijkl mnop",
    "from_email": "sales@acme.com",
    "from_name": "Acme Sales",
    "label": "Sales 1",
}
ADD_EXAMPLES = {
    "gmail": Example(
        summary="A Gmail account with an app password (2-Step Verification on)",
        value=GMAIL_SERVER,
    ),
    "own_server": Example(
        summary="Any SMTP server: host, port and security",
        value={
            "host": "smtp.acme.com",
            "port": 587,
            "security": "starttls",
            "username": "sales@acme.com",
            "password": "a long password",
            "from_email": "sales@acme.com",
            "daily_cap": 300,
        },
    ),
}
SERVER_ID = "0193a5d2-7c4e-7b1a-9f3e-2d6c8b1a4e77"
ADDED_GMAIL_SERVER = {
    "id": SERVER_ID,
    "label": "Sales 1",
    "host": "smtp.gmail.com",
    "port": 587,
    "security": "starttls",
    "username": "sales@acme.com",
    "from_email": "sales@acme.com",
    "from_name": "Acme Sales",
    "daily_cap": 500,
    "auth": "password",
    "oauth_provider": None,
    "has_password": True,
    "status": "active",
    "status_reason": None,
    "last_check": {
        "ok": True,
        "code": None,
        "reply": "Connected, TLS verified and authenticated.",
        "at": "2026-11-27T09:30:00Z",
        "hint": None,
    },
    "imap": None,
    "created_at": "2026-11-27T09:30:00Z",
    "updated_at": "2026-11-27T09:30:00Z",
}


class CheckFailed(Unprocessable):
    """The connection check failed: nothing was stored or changed. `detail` quotes the
    server's reply; `hint` says what to do (for Gmail: an app password)."""

    codes = tuple(code.value for code in CheckCode)
    code = CheckCode.auth_failed.value
    default_detail = (
        "The server refused the credentials. (535 5.7.8 Username and Password not accepted.)"
    )
    hint = "Check the username and password; Gmail needs an app password."


class PasswordRequired(Unprocessable):
    """An endpoint field (host, port, security, username) was given without the password."""

    code = "password_required"
    default_detail = "Giving host needs the password in the same request."
    hint = (
        "Send `password` with the change: the stored password is only ever sent to the "
        "server it was verified against."
    )
    example_errors = (
        FieldError(field="body.password", message="required with host", type="missing"),
    )


class OAuthServer(Unprocessable):
    """The server is connected with OAuth: its endpoint and credentials are the provider's."""

    code = "oauth_server"
    default_detail = (
        "This server is connected with OAuth: its host, port, security, address and "
        "credentials come from the provider."
    )
    hint = "Reconnect it with POST /v1/servers/oauth/google/start and its id as `server_id`."


async def run_check(verifier: Verifier, target: Target) -> CheckOutcome:
    started = time.perf_counter()
    outcome = await verifier.check(target)
    SERVER_VERIFICATION_DURATION.observe(time.perf_counter() - started)
    SERVER_VERIFICATIONS.labels(outcome.code.value if outcome.code else "ok").inc()
    return outcome


def check_failed(outcome: CheckOutcome) -> Unprocessable:
    assert outcome.code is not None
    detail = outcome.detail if outcome.reply is None else f"{outcome.detail} ({outcome.reply})"
    return CheckFailed(detail, code=outcome.code.value, hint=outcome.hint)


# The spec's example of each check code, written by the check's own rules.
CheckFailed.code_examples = {
    outcome.code.value: (error.detail, error.hint)
    for outcome in (
        domain.auth_failure("smtp.gmail.com", 535, "5.7.8 Username and Password not accepted."),
        domain.auth_missing(),
        domain.tls_failure(587, Security.tls, "wrong version number"),
        domain.connect_failed(),
        domain.timed_out(10.0, 587, Security.starttls, "connect"),
        domain.blocked_host(),
        domain.blocked_port(25, (587, 465)),
        domain.dns_failed(),
        domain.protocol_error(554, "5.7.1 Service unavailable"),
    )
    if outcome.code is not None and (error := check_failed(outcome))
}


def record_check(server: SmtpServer, outcome: CheckOutcome) -> None:
    server.last_check_code = outcome.code.value if outcome.code else None
    server.last_check_reply = (outcome.reply or outcome.detail)[:512]
    server.last_checked_at = utcnow()


def password_required(named: Collection[str]) -> Unprocessable:
    names = ", ".join(sorted(named))
    return PasswordRequired(
        f"Giving {names} needs the password in the same request.",
        errors=[
            FieldError(
                field="body.password",
                message=f"required with {names}",
                type="missing",
            )
        ],
    )


def oauth_connection_fixed(provider: str, fields: set[str]) -> Unprocessable:
    return OAuthServer(
        hint=f"Reconnect it with POST /v1/servers/oauth/{provider}/start and its id as "
        "`server_id`, or add a password server separately.",
        errors=[
            FieldError(field=f"body.{name}", message="set by the OAuth provider", type="oauth")
            for name in sorted(fields)
        ],
    )


def missing_fields(body: SmtpServerCreate) -> Unprocessable:
    fields = body.missing_connection_fields()
    return Unprocessable(
        f"Missing {', '.join(fields)}.",
        hint="Give host, port and security, or a preset such as 'gmail'.",
        errors=[
            FieldError(
                field=f"body.{name}", message="required unless a preset gives it", type="missing"
            )
            for name in fields
        ],
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Add a server: connect, TLS, authenticate; store it only if that passes",
)
@example_response(status.HTTP_201_CREATED, ADDED_GMAIL_SERVER)
@raises(CheckFailed, mailbox.ImapCheckFailed, mailbox.ImapIncomplete, repository.ServerExists)
async def add_server(
    body: Annotated[SmtpServerCreate, Body(openapi_examples=ADD_EXAMPLES)],
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    verifier: VerifierDep,
    limiter: LimiterDep,
) -> SmtpServerPublic:
    """The registry connects to the server, says EHLO, sets up TLS (the certificate verified),
    authenticates and quits: no email is sent. Only a server that passes is stored (201, status
    `active`); a failure answers 422 with the check's code and the server's reply, and nothing
    is stored. A `preset` (e.g. `gmail`) gives host, port and security; an optional `imap`
    object is checked the same way. Each check takes one of the tenant's connection checks
    (429 `rate_limited` past the budget)."""
    if body.missing_connection_fields():
        raise missing_fields(body)
    assert body.host is not None
    assert body.port is not None
    assert body.security is not None
    assert body.daily_cap is not None  # the model gives the provider's default
    limiter.take(tenant.id)
    outcome = await run_check(
        verifier,
        Target(
            body.host, body.port, body.security, body.username, body.password.get_secret_value()
        ),
    )
    if not outcome.ok:
        raise check_failed(outcome)
    imap_endpoint = None
    if body.imap is not None:
        imap_endpoint = mailbox.endpoint_for(
            body.imap,
            preset=body.preset,
            smtp_host=body.host,
            smtp_username=body.username,
            password=body.password.get_secret_value(),
        )
        await mailbox.verify(verifier, imap_endpoint)
    if await repository.login_taken(session, tenant.id, body.host, body.username):
        raise repository.duplicate_login()
    server = SmtpServer(
        tenant_id=tenant.id,
        label=body.label or body.host,
        host=body.host,
        port=body.port,
        security=body.security,
        username=body.username,
        from_email=body.from_email,
        from_name=body.from_name,
        daily_cap=body.daily_cap,
        password_ciphertext="",
        status=ServerStatus.active,
    )
    repository.seal_password(keyring, server, body.password.get_secret_value())
    if imap_endpoint is not None:
        mailbox.store(keyring, server, imap_endpoint)
    record_check(server, outcome)
    session.add(server)
    await repository.flush_unique(session)
    return server.to_public()


@router.get("", summary="List the tenant's servers, oldest first")
@raises(InvalidCursor)
async def list_servers(
    tenant: TenantDep,
    session: SessionDep,
    limit: Limit200Query = 50,
    cursor: CursorQuery = None,
) -> SmtpServerPage:
    """Paginated: up to `limit` servers per page; pass `next_cursor` as `cursor` for the next
    page (null on the last)."""
    after = decode_cursor(cursor) if cursor else None
    rows, next_after = await repository.list_servers(session, tenant.id, after=after, limit=limit)
    return SmtpServerPage(
        items=[row.to_public() for row in rows],
        next_cursor=encode_cursor(next_after) if next_after else None,
    )


@router.get("/{server_id}", summary="One server")
@raises(ServerNotFound)
async def get_server(
    server_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SmtpServerPublic:
    """Its status, the last check (`code`, `reply`, `at`, `hint`), warmup-relevant limits and
    its mailbox access; never the password (`has_password` says one is stored). Another
    tenant's id answers 404 like an id that does not exist."""
    return (await repository.get_server(session, tenant.id, server_id)).to_public()


@router.patch(
    "/{server_id}",
    summary=(
        "Change a server; a changed host, port, security or credential is checked first, "
        "and a changed host, port, security or username needs the password again"
    ),
)
@raises(
    ServerNotFound,
    OAuthServer,
    PasswordRequired,
    repository.ServerExists,
    CheckFailed,
    mailbox.ImapCheckFailed,
    mailbox.ImapIncomplete,
)
async def update_server(
    server_id: uuid.UUID,
    body: Annotated[
        SmtpServerUpdate,
        Body(
            openapi_examples={
                "rename": Example(summary="Change the label", value={"label": "Sales EU"}),
                "new_password": Example(
                    summary="A new app password (checked before it is saved)",
                    value={"password": "qrst uvwx yzab cdef"},
                ),
            }
        ),
    ],
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    verifier: VerifierDep,
    limiter: LimiterDep,
) -> SmtpServerPublic:
    """Only the fields sent change. A changed host, port, security, username or password is
    checked before anything is saved (422 with the check's code otherwise, nothing changed). A
    request naming host, port, security or username needs `password` in the same request (422
    `password_required`): the stored password is only ever sent to the server it was verified
    against. An OAuth server's endpoint and credentials cannot be changed (422 `oauth_server`)."""
    server = await repository.get_server(session, tenant.id, server_id)
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    connection_changed = {
        name
        for name in CONNECTION_FIELDS & changes.keys()
        if name == "password" or changes[name] != getattr(server, name)
    }
    if connection_changed and AuthMethod(server.auth) is AuthMethod.xoauth2:
        raise oauth_connection_fixed(server.oauth_provider or "google", connection_changed)
    # Named at all, changed or not: the spec states this rule (a client can check it before
    # sending), and a request is refused before any connection, so the stored password never
    # leaves for a new endpoint.
    endpoint_named = ENDPOINT_FIELDS & changes.keys()
    if endpoint_named and body.password is None:
        raise password_required(endpoint_named)
    host = body.host or server.host
    username = body.username or server.username
    if {"host", "username"} & connection_changed and await repository.login_taken(
        session, tenant.id, host, username, exclude=server.id
    ):
        raise repository.duplicate_login()
    if connection_changed:
        # Only the password of this request is ever dialled here (the rule above): the stored
        # one is not even decrypted.
        assert body.password is not None
        limiter.take(tenant.id)
        target = Target(
            host,
            body.port or server.port,
            body.security or Security(server.security),
            username,
            body.password.get_secret_value(),
        )
        outcome = await run_check(verifier, target)
        if not outcome.ok:
            raise check_failed(outcome)
        record_check(server, outcome)
        if server.status != ServerStatus.paused:
            server.status = ServerStatus.active
    for name in (
        "label",
        "from_email",
        "from_name",
        "daily_cap",
        "host",
        "port",
        "security",
        "username",
    ):
        if name in changes:
            setattr(server, name, changes[name])
    if body.password is not None:
        repository.seal_password(keyring, server, body.password.get_secret_value())
    if body.imap is not None:
        await mailbox.update(verifier, keyring, server, body.imap)
    server.updated_at = utcnow()
    session.add(server)
    await repository.flush_unique(session)
    return server.to_public()


@router.delete("/{server_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a server")
@raises(ServerNotFound)
async def delete_server(server_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> Response:
    """Its credentials are deleted with it; emails already sent through it keep their record."""
    server = await repository.get_server(session, tenant.id, server_id)
    await session.delete(server)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{server_id}/verify",
    summary="Check the server again; its status becomes `active` or the failure found",
)
@raises(ServerNotFound)
async def verify_server(
    server_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    verifier: VerifierDep,
    limiter: LimiterDep,
    tokens: TokenKeeperDep,
) -> SmtpServerPublic:
    """The same check as on add, with the stored credentials (an OAuth server's refreshed
    access token). The outcome is the server's status and `last_check`, not an error: a server
    that fails answers 200 with status `auth_failed`, `tls_failed`, ... A paused server stays
    paused."""
    server = await repository.get_server(session, tenant.id, server_id)
    limiter.take(tenant.id)
    if AuthMethod(server.auth) is AuthMethod.xoauth2:
        outcome = await _verify_oauth(session, server, verifier, tokens)
    else:
        target = Target(
            server.host,
            server.port,
            Security(server.security),
            server.username,
            repository.open_password(keyring, server),
        )
        outcome = await run_check(verifier, target)
    record_check(server, outcome)
    if server.status != ServerStatus.paused:
        server.status = domain.status_after_check(outcome)
    server.updated_at = utcnow()
    session.add(server)
    return server.to_public()


async def _verify_oauth(
    session: AsyncSession, server: SmtpServer, verifier: Verifier, tokens: TokenKeeper
) -> CheckOutcome:
    """The XOAUTH2 check with a current access token (refreshed if needed)."""
    # The refresh writes the row in a transaction of its own; this request's read transaction
    # ends first, so that (on SQLite) its later write does not meet a newer snapshot.
    await session.commit()
    outcome: CheckOutcome | None = None
    rejected: str | None = None
    # As the senders do: a refused token gets one refresh and one more try.
    for _ in range(2):
        try:
            token = await tokens.token(server, rejected)
        except TokenUnavailable:
            return CheckOutcome(
                CheckCode.connect_failed,
                "The OAuth provider could not be reached to refresh the access token.",
                "Try again shortly.",
            )
        if token is None:
            return CheckOutcome(
                CheckCode.auth_failed,
                "The OAuth provider refused to refresh the access token.",
                status_hint("auth_failed", None, AuthMethod.xoauth2, server.oauth_provider),
                "invalid_grant: the provider refused the refresh",
            )
        target = Target(
            server.host,
            server.port,
            Security(server.security),
            server.username,
            token.value,
            AuthMethod.xoauth2,
        )
        outcome = await run_check(verifier, target)
        if outcome.code is not CheckCode.auth_failed:
            return outcome
        rejected = token_digest(token.value)
    assert outcome is not None
    return outcome


@router.post("/{server_id}/pause", summary="Stop sending through this server")
@raises(ServerNotFound)
async def pause_server(
    server_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SmtpServerPublic:
    """Its queued emails go to the tenant's other servers; emails already handed to a sender
    may still leave through it."""
    server = await repository.get_server(session, tenant.id, server_id)
    server.status = ServerStatus.paused
    server.updated_at = utcnow()
    session.add(server)
    return server.to_public()


@router.post(
    "/{server_id}/resume",
    summary="Send through this server again; it returns to the status of its last check",
)
@raises(ServerNotFound)
async def resume_server(
    server_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SmtpServerPublic:
    """Undoes a pause (and a pause for bounces): the status becomes what the last check found,
    `active` or its failure. Resuming a server that is not paused changes nothing."""
    server = await repository.get_server(session, tenant.id, server_id)
    if server.status in (ServerStatus.paused, ServerStatus.paused_bounces):
        server.status_reason = None
        last = domain.CheckOutcome(
            code=domain.CheckCode(server.last_check_code) if server.last_check_code else None,
            detail="",
        )
        server.status = domain.status_after_check(last)
        server.updated_at = utcnow()
        session.add(server)
    return server.to_public()
