"""A tenant's SMTP servers. Only a server that passes the connection check is stored."""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
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
from shared.errors import PROBLEM_RESPONSES, FieldError, Unprocessable, problem_doc
from shared.metrics import SERVER_VERIFICATION_DURATION, SERVER_VERIFICATIONS
from shared.pagination import CURSOR_PATTERN, decode_cursor, encode_cursor
from shared.tenancy import TenantDep
from shared.timeutil import utcnow

CHECK_RESPONSES = {
    **PROBLEM_RESPONSES,
    409: problem_doc("Same host and username already added"),
    422: problem_doc("Invalid input, or the connection check failed"),
    429: problem_doc("Too many connection checks"),
}

router = APIRouter(prefix="/v1/servers", tags=["servers"], responses=PROBLEM_RESPONSES)


async def run_check(verifier: Verifier, target: Target) -> CheckOutcome:
    started = time.perf_counter()
    outcome = await verifier.check(target)
    SERVER_VERIFICATION_DURATION.observe(time.perf_counter() - started)
    SERVER_VERIFICATIONS.labels(outcome.code.value if outcome.code else "ok").inc()
    return outcome


def check_failed(outcome: CheckOutcome) -> Unprocessable:
    assert outcome.code is not None
    detail = outcome.detail if outcome.reply is None else f"{outcome.detail} ({outcome.reply})"
    return Unprocessable(detail, code=outcome.code.value, hint=outcome.hint)


def record_check(server: SmtpServer, outcome: CheckOutcome) -> None:
    server.last_check_code = outcome.code.value if outcome.code else None
    server.last_check_reply = (outcome.reply or outcome.detail)[:512]
    server.last_checked_at = utcnow()


def password_required(named: Collection[str]) -> Unprocessable:
    names = ", ".join(sorted(named))
    return Unprocessable(
        f"Giving {names} needs the password in the same request.",
        code="password_required",
        hint=(
            "Send `password` with the change: the stored password is only ever sent to the "
            "server it was verified against."
        ),
        errors=[
            FieldError(
                field="body.password",
                message=f"required with {names}",
                type="missing",
            )
        ],
    )


def oauth_connection_fixed(provider: str, fields: set[str]) -> Unprocessable:
    return Unprocessable(
        "This server is connected with OAuth: its host, port, security, address and "
        "credentials come from the provider.",
        code="oauth_server",
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
    responses=CHECK_RESPONSES,
    summary="Add a server: connect, TLS, authenticate; store it only if that passes",
)
async def add_server(
    body: SmtpServerCreate,
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    verifier: VerifierDep,
    limiter: LimiterDep,
) -> SmtpServerPublic:
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
async def list_servers(
    tenant: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN)] = None,
) -> SmtpServerPage:
    after = decode_cursor(cursor) if cursor else None
    rows, next_after = await repository.list_servers(session, tenant.id, after=after, limit=limit)
    return SmtpServerPage(
        items=[row.to_public() for row in rows],
        next_cursor=encode_cursor(next_after) if next_after else None,
    )


@router.get("/{server_id}", summary="One server")
async def get_server(
    server_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SmtpServerPublic:
    return (await repository.get_server(session, tenant.id, server_id)).to_public()


@router.patch(
    "/{server_id}",
    responses=CHECK_RESPONSES,
    summary=(
        "Change a server; a changed host, port, security or credential is checked first, "
        "and a changed host, port, security or username needs the password again"
    ),
)
async def update_server(
    server_id: uuid.UUID,
    body: SmtpServerUpdate,
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    verifier: VerifierDep,
    limiter: LimiterDep,
) -> SmtpServerPublic:
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
async def delete_server(server_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> Response:
    server = await repository.get_server(session, tenant.id, server_id)
    await session.delete(server)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{server_id}/verify",
    responses={429: CHECK_RESPONSES[429]},
    summary="Check the server again; its status becomes `active` or the failure found",
)
async def verify_server(
    server_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    keyring: KeyringDep,
    verifier: VerifierDep,
    limiter: LimiterDep,
    tokens: TokenKeeperDep,
) -> SmtpServerPublic:
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
async def pause_server(
    server_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SmtpServerPublic:
    server = await repository.get_server(session, tenant.id, server_id)
    server.status = ServerStatus.paused
    server.updated_at = utcnow()
    session.add(server)
    return server.to_public()


@router.post(
    "/{server_id}/resume",
    summary="Send through this server again; it returns to the status of its last check",
)
async def resume_server(
    server_id: uuid.UUID, tenant: TenantDep, session: SessionDep
) -> SmtpServerPublic:
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
