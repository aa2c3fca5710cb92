"""The registry's use cases for tenants and their SMTP servers: add, update, check again, pause,
resume, delete, and a tenant's creation. Routes parse the request, call one of these and render
the answer; the errors raised here are the hierarchy of `shared.errors`, mapped to HTTP there.

Every connection check goes through `Checker` (the tenant's budget, then the check, measured)
and every outcome is recorded by `SmtpServer.record_check`, which applies the one status rule of
`domain.settled_status`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass

from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import domain, mailbox, repository
from services.registry.domain import (
    AuthMethod,
    CheckCode,
    CheckOutcome,
    Security,
    ServerStatus,
    TokenBucket,
    status_after_check,
    status_hint,
)
from services.registry.models import (
    CONNECTION_FIELDS,
    ENDPOINT_FIELDS,
    SmtpServer,
    SmtpServerCreate,
    SmtpServerUpdate,
    Tenant,
    TenantCreated,
    default_daily_cap,
)
from services.registry.oauth.tokens import TokenKeeper, TokenUnavailable, token_digest
from services.registry.provider_dns import Detection
from services.registry.verifier import Target, Verifier
from shared.crypto import Keyring
from shared.errors import FieldError, RateLimited, Unprocessable
from shared.metrics import SERVER_VERIFICATION_DURATION, SERVER_VERIFICATIONS
from shared.settings import RegistrySettings
from shared.tenancy import hash_api_key, new_api_key
from shared.timeutil import utcnow


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


def password_required(named: Collection[str]) -> Unprocessable:
    names = ", ".join(sorted(named))
    return PasswordRequired(
        f"Giving {names} needs the password in the same request.",
        errors=[
            FieldError(field="body.password", message=f"required with {names}", type="missing")
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


def missing_fields(fields: Sequence[str]) -> Unprocessable:
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


class CheckLimiter:
    """Per-tenant budget of connection checks, so the registry cannot be used to hammer a host.

    Held in memory per replica: with N registry replicas a tenant gets at most N times the rate.
    """

    def __init__(self, settings: RegistrySettings) -> None:
        self.rate = settings.verify_rate_per_minute / 60.0
        self.burst = float(settings.verify_burst)
        self.buckets: dict[uuid.UUID, TokenBucket] = {}

    def take(self, tenant_id: uuid.UUID) -> None:
        bucket = self.buckets.setdefault(tenant_id, TokenBucket(self.rate, self.burst))
        wait = bucket.take(time.monotonic())
        if wait > 0:
            raise RateLimited(
                "Too many connection checks for this tenant.",
                retry_after_seconds=int(wait) + 1,
            )


@dataclass(frozen=True)
class Checker:
    """The connection check as every use case runs it: one of the tenant's budget, then the
    check (measured), whatever the credentials."""

    verifier: Verifier
    limiter: CheckLimiter

    async def run(self, target: Target) -> CheckOutcome:
        started = time.perf_counter()
        outcome = await self.verifier.check(target)
        SERVER_VERIFICATION_DURATION.observe(time.perf_counter() - started)
        SERVER_VERIFICATIONS.labels(outcome.code.value if outcome.code else "ok").inc()
        return outcome

    async def check(self, tenant_id: uuid.UUID, target: Target) -> CheckOutcome:
        self.limiter.take(tenant_id)
        return await self.run(target)

    async def require(self, tenant_id: uuid.UUID, target: Target) -> CheckOutcome:
        """The check of credentials about to be stored: a failure stores nothing."""
        outcome = await self.check(tenant_id, target)
        if not outcome.ok:
            raise check_failed(outcome)
        return outcome

    async def require_detecting(
        self, tenant_id: uuid.UUID, target: Target, from_email: str
    ) -> tuple[CheckOutcome, Detection]:
        """`require`, and the provider behind the account, looked up beside the check."""
        outcome, detection = await beside(
            self.check(tenant_id, target),
            self.verifier.provider_dns.detect(target.host, target.username, from_email),
            cancel_on_failure=True,
        )
        if not outcome.ok:
            raise check_failed(outcome)
        assert detection is not None
        return outcome, detection


async def beside(
    check: Awaitable[CheckOutcome],
    detection: Awaitable[Detection],
    *,
    cancel_on_failure: bool = False,
) -> tuple[CheckOutcome, Detection | None]:
    """The check and the provider's DNS lookups at once: the lookups add nothing to a check
    that takes longer than they do, and a timeout of theirs nothing past
    `ABL_DNS_TIMEOUT_SECONDS`. A check that raises (the tenant's budget) cancels them."""
    lookups = asyncio.ensure_future(detection)
    try:
        outcome = await check
    except BaseException:
        lookups.cancel()
        raise
    if cancel_on_failure and not outcome.ok:
        lookups.cancel()  # nothing will be stored: no need to wait for DNS
        return outcome, None
    return outcome, await lookups


def apply_detection(server: SmtpServer, detection: Detection, *, endpoint_changed: bool) -> None:
    """Store what the check's lookups found. A lookup that failed and found nothing leaves the
    stored provider of the same endpoint as it was: a DNS hiccup at a re-check must not drop a
    Microsoft 365 server to the cap of an unknown one."""
    if detection.provider is not None or not detection.failed or endpoint_changed:
        server.provider = detection.provider.key if detection.provider else None


async def create_tenant(session: AsyncSession, name: str) -> TenantCreated:
    """A tenant and its API key; only the key's SHA-256 is stored."""
    api_key = new_api_key()
    tenant = Tenant(name=name, api_key_hash=hash_api_key(api_key), api_key_prefix=api_key[:12])
    await repository.add_tenant(session, tenant)
    return TenantCreated(
        id=tenant.id,
        name=tenant.name,
        api_key_prefix=tenant.api_key_prefix,
        created_at=tenant.created_at,
        api_key=api_key,
    )


async def add_server(
    session: AsyncSession,
    keyring: Keyring,
    checker: Checker,
    tenant_id: uuid.UUID,
    body: SmtpServerCreate,
) -> SmtpServer:
    """Check the server (and its mailbox, if given); store it only if that passes."""
    missing = body.missing_connection_fields()
    if missing:
        raise missing_fields(missing)
    assert body.host is not None
    assert body.port is not None
    assert body.security is not None
    assert body.daily_cap is not None  # the model gives the provider's default
    password = body.password.get_secret_value()
    target = Target(body.host, body.port, body.security, body.username, password)
    outcome, detection = await checker.require_detecting(tenant_id, target, body.from_email)
    provider = detection.provider
    imap_endpoint = None
    if body.imap is not None:
        imap_endpoint = mailbox.endpoint_for(
            body.imap,
            preset=body.preset,
            smtp_host=body.host,
            smtp_username=body.username,
            password=password,
        )
        await mailbox.verify(checker.verifier, imap_endpoint)
    if await repository.login_taken(session, tenant_id, body.host, body.username):
        raise repository.ServerExists()
    server = SmtpServer(
        tenant_id=tenant_id,
        label=body.label or body.host,
        host=body.host,
        port=body.port,
        security=body.security,
        username=body.username,
        from_email=body.from_email,
        from_name=body.from_name,
        # Left out, it follows the provider the check found (perhaps only through DNS).
        daily_cap=default_daily_cap(provider) if body.daily_cap_defaulted else body.daily_cap,
        password_ciphertext="",
        status=ServerStatus.active,
        provider=provider.key if provider else None,
    )
    repository.seal_password(keyring, server, password)
    if imap_endpoint is not None:
        mailbox.store(keyring, server, imap_endpoint)
    server.record_check(outcome, utcnow())
    session.add(server)
    await repository.flush_unique(session)
    return server


# Settings a PATCH copies as given, once the connection (if it changed) has passed its check.
_UPDATABLE = (
    "label",
    "from_email",
    "from_name",
    "daily_cap",
    "host",
    "port",
    "security",
    "username",
)


async def update_server(
    session: AsyncSession,
    keyring: Keyring,
    checker: Checker,
    tenant_id: uuid.UUID,
    server_id: uuid.UUID,
    body: SmtpServerUpdate,
) -> SmtpServer:
    """Only the fields sent change; a changed connection is checked before anything is saved."""
    server = await repository.get_server(session, tenant_id, server_id)
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
        session, tenant_id, host, username, exclude=server.id
    ):
        raise repository.ServerExists()
    if connection_changed:
        # Only the password of this request is ever dialled here (the rule above): the stored
        # one is not even decrypted.
        assert body.password is not None
        target = Target(
            host,
            body.port or server.port,
            body.security or Security(server.security),
            username,
            body.password.get_secret_value(),
        )
        outcome, detection = await checker.require_detecting(
            tenant_id, target, body.from_email or server.from_email
        )
        server.record_check(outcome, utcnow())
        apply_detection(
            server, detection, endpoint_changed=bool({"host", "username"} & connection_changed)
        )
    for name in _UPDATABLE:
        if name in changes:
            setattr(server, name, changes[name])
    if body.password is not None:
        repository.seal_password(keyring, server, body.password.get_secret_value())
    if body.imap is not None:
        await mailbox.update(checker.verifier, keyring, server, body.imap)
    server.updated_at = utcnow()
    session.add(server)
    await repository.flush_unique(session)
    return server


async def verify_server(
    session: AsyncSession,
    keyring: Keyring,
    checker: Checker,
    tokens: TokenKeeper,
    tenant_id: uuid.UUID,
    server_id: uuid.UUID,
) -> SmtpServer:
    """Check the server again with its stored credentials; the outcome is its status."""
    server = await repository.get_server(session, tenant_id, server_id)
    check: Awaitable[CheckOutcome]
    if AuthMethod(server.auth) is AuthMethod.xoauth2:
        checker.limiter.take(tenant_id)
        check = _check_oauth(session, server, checker, tokens)
    else:
        target = Target(
            server.host,
            server.port,
            Security(server.security),
            server.username,
            repository.open_password(keyring, server),
        )
        check = checker.check(tenant_id, target)
    # The provider is looked up again whatever the outcome: a re-check is how a tenant whose
    # domain moved (to Microsoft 365, say) gets the new limits.
    lookups = checker.verifier.provider_dns.detect(server.host, server.username, server.from_email)
    outcome, detection = await beside(check, lookups)
    assert detection is not None
    server.record_check(outcome, utcnow())
    apply_detection(server, detection, endpoint_changed=False)
    session.add(server)
    return server


async def _check_oauth(
    session: AsyncSession, server: SmtpServer, checker: Checker, tokens: TokenKeeper
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
        outcome = await checker.run(target)
        if outcome.code is not CheckCode.auth_failed:
            return outcome
        rejected = token_digest(token.value)
    assert outcome is not None
    return outcome


# Reads are the repository's queries as they are: nothing to decide.
list_servers = repository.list_servers
get_server = repository.get_server


async def delete_server(session: AsyncSession, tenant_id: uuid.UUID, server_id: uuid.UUID) -> None:
    """Its credentials go with it; emails already sent through it keep their record."""
    await session.delete(await repository.get_server(session, tenant_id, server_id))


async def pause_server(
    session: AsyncSession, tenant_id: uuid.UUID, server_id: uuid.UUID
) -> SmtpServer:
    server = await repository.get_server(session, tenant_id, server_id)
    server.status = ServerStatus.paused
    server.updated_at = utcnow()
    session.add(server)
    return server


async def resume_server(
    session: AsyncSession, tenant_id: uuid.UUID, server_id: uuid.UUID
) -> SmtpServer:
    """A paused server (by hand or for bounces) returns to the status of its last check; any
    other is left as it is."""
    server = await repository.get_server(session, tenant_id, server_id)
    if server.status in (ServerStatus.paused, ServerStatus.paused_bounces):
        server.status_reason = None
        last = CheckOutcome(
            code=CheckCode(server.last_check_code) if server.last_check_code else None,
            detail="",
        )
        server.status = status_after_check(last)
        server.updated_at = utcnow()
        session.add(server)
    return server
