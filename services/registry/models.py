"""SMTP servers: the `SmtpServer` table and the shapes the API reads and writes.

A Public model never holds the password; the table holds it only encrypted.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal, Self

from annotated_types import Interval
from pydantic import PrivateAttr, SecretStr, WithJsonSchema, field_validator, model_validator
from sqlalchemy import Column, ForeignKey, String, UniqueConstraint
from sqlmodel import Field, SQLModel
from sqlmodel._compat import SQLModelConfig

from services.registry.domain import (
    PRESETS,
    AuthMethod,
    CheckOutcome,
    Security,
    ServerStatus,
    settled_status,
    status_after_check,
    status_hint,
)
from shared.imap import ImapSecurity
from shared.outbox import OutboxRecord
from shared.providers import Provider, detect, provider_of
from shared.timeutil import UtcDateTime, new_id, utcnow
from shared.validation import (
    JSON_INTEGER,
    ONE_LINE_PATTERN,
    Address,
    OneLineText,
    SchemaPattern,
    refuse_control_chars,
)

# The largest any known provider allows one mailbox (Microsoft 365: 10,000 recipients a day);
# a server added without `daily_cap` gets its provider's limit, or DEFAULT_DAILY_CAP.
MAX_DAILY_CAP = 10_000
DEFAULT_DAILY_CAP = 500
# Changing any of these re-runs the connection check before the change is saved.
CONNECTION_FIELDS = frozenset({"host", "port", "security", "username", "password"})
# Where (and as whom) the password is sent. Changing any of these needs the password in the
# same request: the stored one is only ever sent to the endpoint it was verified against, or a
# tenant (or a leaked API key) could point a server at a host of its choosing and read it.
ENDPOINT_FIELDS = frozenset({"host", "port", "security", "username"})
HOST_MAX = 253
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# What `_clean_host` accepts, for the spec: an ASCII host name (an internationalised one in its
# IDNA `xn--` form; an IPv4 address is one too) or an IPv6 address.
HOST_PATTERN = rf"^{_LABEL}(?:\.{_LABEL})*\.?$"
HostName = Annotated[
    str,
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": HOST_MAX,
            "anyOf": [{"pattern": HOST_PATTERN}, {"format": "ipv6"}],
            "description": (
                "A host name such as smtp.example.com (an internationalised name in its IDNA "
                "`xn--` form), or an IP address. Stored lowercase."
            ),
        }
    ),
]
Password = Annotated[SecretStr, SchemaPattern(ONE_LINE_PATTERN)]
Port = Annotated[int, Interval(ge=1, le=65535), JSON_INTEGER]
DailyCap = Annotated[int, Interval(ge=1, le=MAX_DAILY_CAP), JSON_INTEGER]
PresetName = StrEnum("PresetName", {name: name for name in PRESETS})  # type: ignore[misc]


def default_daily_cap(provider: Provider | None) -> int:
    return provider.daily if provider else DEFAULT_DAILY_CAP


def _clean_text(value: str | None) -> str | None:
    # Checked before the strip: a separator at either end is refused, not silently dropped.
    return None if value is None else refuse_control_chars(value).strip()


def _clean_lower(value: str | None) -> str | None:
    cleaned = _clean_text(value)
    return None if cleaned is None else cleaned.lower()


_HOST = re.compile(HOST_PATTERN)


def _clean_host(value: str | None) -> str | None:
    """A host name (an internationalised one in its IDNA `xn--` form) or an IPv6 address,
    exactly as HOST_PATTERN says, stored lowercase.

    Anything else is refused here rather than handed to DNS. Not trimmed, and Unicode names are
    not converted: the spec's pattern is the rule, and a client checking against it must never
    see the API accept what the pattern refuses."""
    if value is None:
        return None
    refuse_control_chars(value)
    if ":" in value and "%" not in value:
        try:
            # Scoped addresses (fe80::1%eth0) are not in JSON Schema's ipv6 format.
            return str(ipaddress.IPv6Address(value))
        except ValueError:
            pass
    elif value.isascii() and _HOST.fullmatch(value):
        return value.lower()
    if not value.isascii():
        raise ValueError(
            "must be in ASCII: give an internationalised host name in its IDNA (xn--) form"
        )
    raise ValueError("must be a host name such as smtp.example.com, or an IP address")


def _clean_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None:
        refuse_control_chars(value.get_secret_value())
    return value


class TenantBase(SQLModel):
    name: OneLineText = Field(min_length=1, max_length=200)

    @field_validator("name")
    @classmethod
    def _clean_name(cls, value: str) -> str:
        # min_length is checked before this strip: a name of spaces would pass it and then be
        # stored empty (and fail the response model with a 500).
        cleaned = refuse_control_chars(value).strip()
        if not cleaned:
            raise ValueError("must not be blank")
        return cleaned


class TenantCreate(TenantBase):
    pass


class TenantPublic(TenantBase):
    id: uuid.UUID
    api_key_prefix: str
    created_at: datetime


class TenantCreated(TenantPublic):
    api_key: str


class Tenant(TenantBase, table=True):
    __tablename__ = "tenants"

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    api_key_hash: str = Field(max_length=64, unique=True, index=True)
    api_key_prefix: str = Field(max_length=16)
    created_at: datetime = Field(
        default_factory=utcnow,
        sa_type=UtcDateTime,
    )
    # Raised by every change the copies of other services hear of (`services.registry.changes`).
    version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class SmtpServerBase(SQLModel):
    label: OneLineText = Field(default="", max_length=100)
    # A plain string here: checked on the way in (Create, Update) and stored in ASCII form,
    # which EmailStr would turn back into Unicode on the way out.
    from_email: str = Field(max_length=320)
    from_name: OneLineText = Field(default="", max_length=100)
    # JSON integers only: `true` or `"5"` is not a number of emails.
    daily_cap: DailyCap = Field(default=DEFAULT_DAILY_CAP)

    _clean_label = field_validator("label", "from_name")(_clean_text)


class ImapCreate(SQLModel):
    """Mailbox access for the mailbox reader; every field optional: host and port from the
    preset or the provider of the SMTP host, username and password the SMTP ones."""

    model_config = SQLModelConfig(hide_input_in_errors=True)

    # The same types as the SMTP fields, so the spec says what is accepted.
    host: HostName | None = Field(default=None, min_length=1, max_length=HOST_MAX)
    port: Port | None = None
    security: ImapSecurity | None = Field(
        default=None, description="`tls` (port 993, the default) or `starttls` (143)."
    )
    username: OneLineText | None = Field(default=None, min_length=1, max_length=320)
    password: Password | None = Field(default=None, min_length=1, max_length=1024)

    _clean_host = field_validator("host")(_clean_host)
    _clean_username = field_validator("username")(_clean_lower)
    _clean_password = field_validator("password")(_clean_secret)


class OAuthImap(SQLModel):
    """Read the connected mailbox over IMAP with the same grant (SASL XOAUTH2): at the
    provider's IMAP server, as the grant's account, with no password."""

    port: Port | None = Field(default=None, description="The provider's IMAP port (993) if unset.")
    security: ImapSecurity | None = Field(
        default=None, description="`tls` (the default) or `starttls` (port 143)."
    )


class ImapPublic(SQLModel):
    host: str
    port: int
    security: ImapSecurity
    username: str
    has_password: bool = True
    last_poll_at: datetime | None = Field(description="When the mailbox reader last read it.")
    last_poll_error: str | None = Field(description="Why the last read failed, if it did.")


class SmtpServerCreate(SmtpServerBase):
    # The spec says what `missing_connection_fields` checks: a preset, or host, port and
    # security (null counts as absent).
    model_config = SQLModelConfig(
        hide_input_in_errors=True,
        json_schema_extra={
            "anyOf": [
                {
                    "required": ["preset"],
                    "properties": {"preset": {"$ref": "#/components/schemas/PresetName"}},
                },
                {
                    "required": ["host", "port", "security"],
                    "properties": {
                        "host": {"type": "string"},
                        "port": {"type": "integer"},
                        "security": {"$ref": "#/components/schemas/Security"},
                    },
                },
            ]
        },
    )

    from_email: Address = Field(max_length=320)
    daily_cap: int | None = Field(  # type: ignore[assignment]
        default=None,
        ge=1,
        le=MAX_DAILY_CAP,
        description="Defaults to the provider's daily limit (Gmail 500, Google Workspace "
        "2,000, Microsoft 365 10,000, ...), or 500 for a server of unknown provider. The "
        "provider is told from the SMTP host, else at the check from its CNAME chain or the "
        "MX records of the account's domain (see `provider` in the answer).",
    )

    preset: PresetName | None = Field(
        default=None,
        description="Fills host, port and security; explicit ones win over the preset's.",
    )
    host: HostName | None = Field(default=None, min_length=1, max_length=HOST_MAX)
    port: Port | None = None
    security: Security | None = None
    username: OneLineText = Field(min_length=1, max_length=320)
    password: Password = Field(min_length=1, max_length=1024)
    imap: ImapCreate | None = Field(
        default=None, description="Mailbox access, so bounces and replies can be read."
    )

    _clean_host = field_validator("host")(_clean_host)
    _clean_username = field_validator("username")(_clean_lower)
    _clean_password = field_validator("password")(_clean_secret)
    # `daily_cap` was left out: the check's DNS answers may still name the provider, whose
    # limit then replaces the host's default (`service.add_server`).
    _daily_cap_defaulted: bool = PrivateAttr(default=False)

    @property
    def daily_cap_defaulted(self) -> bool:
        return self._daily_cap_defaulted

    @model_validator(mode="after")
    def _apply_preset(self) -> Self:
        if self.preset is not None:
            preset = PRESETS[self.preset.value]
            self.host = self.host or preset.host
            self.port = self.port or preset.port
            self.security = self.security or preset.security
        if self.daily_cap is None:
            self._daily_cap_defaulted = True
            self.daily_cap = default_daily_cap(detect(self.host or "", self.username))
        return self

    def missing_connection_fields(self) -> list[str]:
        return [name for name in ("host", "port", "security") if getattr(self, name) is None]


class SmtpServerUpdate(SQLModel):
    # The spec says what update_server checks: host, port, security or username (non-null)
    # come with the password.
    model_config = SQLModelConfig(
        hide_input_in_errors=True,
        json_schema_extra={
            "anyOf": [
                {"required": ["password"], "properties": {"password": {"type": "string"}}},
                {"properties": {name: {"type": "null"} for name in sorted(ENDPOINT_FIELDS)}},
            ]
        },
    )

    label: OneLineText | None = Field(default=None, max_length=100)
    from_email: Address | None = Field(default=None, max_length=320)
    from_name: OneLineText | None = Field(default=None, max_length=100)
    daily_cap: DailyCap | None = None
    host: HostName | None = Field(default=None, min_length=1, max_length=HOST_MAX)
    port: Port | None = None
    security: Security | None = None
    username: OneLineText | None = Field(default=None, min_length=1, max_length=320)
    password: Password | None = Field(default=None, min_length=1, max_length=1024)
    imap: ImapCreate | None = Field(
        default=None,
        description="Add or change mailbox access (checked first). A host, port, security or "
        "username other than the stored ones needs `imap.password`.",
    )

    _clean_label = field_validator("label", "from_name")(_clean_text)
    _clean_host = field_validator("host")(_clean_host)
    _clean_username = field_validator("username")(_clean_lower)
    _clean_password = field_validator("password")(_clean_secret)


class LastCheck(SQLModel):
    ok: bool
    code: str | None
    reply: str | None
    at: datetime | None
    hint: str | None = Field(default=None, description="What a person can do about a failure.")


class ServerReputation(SQLModel):
    """The server's recent bounce and complaint rates, as the scheduler last reported them with
    a read of the server's mailbox (the scheduler owns the emails; the registry keeps the last
    report)."""

    sample: int = Field(
        description="Emails that left among the server's last `ABL_BOUNCE_WINDOW` (200) when the "
        "rates were counted: the rates are over these."
    )
    bounce_rate: float | None = Field(
        description="Hard bounces / sample (0.05 is 5 %); null before a send. Above "
        "`ABL_BOUNCE_PAUSE_RATIO` the bounce-rate guard pauses the server."
    )
    complaint_rate: float | None = Field(
        description="Complaints (ARF reports) / sample; null before a send. Above "
        "`ABL_COMPLAINT_PAUSE_RATIO` the guard pauses the server."
    )
    at: datetime = Field(
        description="When they were counted: the mailbox reader's read that reported them."
    )


class SmtpServerPublic(SmtpServerBase):
    id: uuid.UUID
    host: str
    port: int
    security: Security
    username: str
    status: ServerStatus
    auth: AuthMethod = AuthMethod.password
    oauth_provider: str | None = Field(
        default=None, description="`google` or `microsoft` for a server connected with OAuth."
    )
    has_password: bool = True
    provider: str | None = Field(
        default=None,
        description="The mailbox provider behind the server, stored at its check: told from "
        "the SMTP host, else its CNAME chain, else the MX records of the account's domain "
        "(gmail, google_workspace, office365, outlook, zoho, yahoo, icloud, fastmail); null "
        "for an unknown server (an own MTA), or when DNS did not answer. Its limits are the "
        "ones the scheduler keeps (see GET /v1/servers/{id}/warmup).",
    )
    last_check: LastCheck
    status_reason: str | None = Field(
        default=None, description="Why the server was paused by the bounce-rate guard."
    )
    imap: ImapPublic | None = None
    reputation: ServerReputation | None = Field(
        default=None,
        description="Bounce and complaint rates over the server's last sent emails, reported by "
        "the mailbox reader after each read of its mailbox; null until the first report (and for "
        "a server without `imap`). The same numbers as `reputation` on GET "
        "/v1/servers/{id}/warmup as of `at`, which also shows the pause ratios and today's "
        "bounces.",
    )
    created_at: datetime
    updated_at: datetime


class SmtpServerPage(SQLModel):
    items: list[SmtpServerPublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


class HealthAck(SQLModel):
    id: uuid.UUID
    status: ServerStatus


class SmtpServer(SmtpServerBase, table=True):
    __tablename__ = "smtp_servers"
    __table_args__ = (
        UniqueConstraint("tenant_id", "host", "username", name="uq_smtp_servers_tenant_login"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    tenant_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    host: str = Field(max_length=HOST_MAX)
    port: int
    security: Security = Field(sa_type=String(16))
    username: str = Field(max_length=320)
    from_email: str = Field(max_length=320)
    # Empty for a server connected with OAuth, which has a refresh token instead.
    password_ciphertext: str = Field(max_length=4096)
    auth: AuthMethod = Field(
        default=AuthMethod.password,
        sa_column=Column(String(16), nullable=False, server_default=AuthMethod.password.value),
    )
    oauth_provider: str | None = Field(default=None, max_length=32)
    # A key of `shared.providers.PROVIDERS`, detected at the last check that could tell;
    # null for an unknown server and for rows stored before it was (then the host decides).
    provider: str | None = Field(default=None, max_length=32)
    # Encrypted like the password (same keyring, associated data naming tenant, server and
    # purpose); the refresh token never leaves the registry.
    refresh_token_ciphertext: str | None = Field(default=None, max_length=8192)
    access_token_ciphertext: str | None = Field(default=None, max_length=16384)
    access_token_expires_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    status: ServerStatus = Field(default=ServerStatus.active, sa_type=String(32), index=True)
    last_check_code: str | None = Field(default=None, max_length=32)
    last_check_reply: str | None = Field(default=None, max_length=512)
    last_checked_at: datetime | None = Field(
        default=None,
        sa_type=UtcDateTime,
    )
    status_reason: str | None = Field(default=None, max_length=512)
    imap_host: str | None = Field(default=None, max_length=HOST_MAX)
    imap_port: int | None = None
    imap_security: str | None = Field(default=None, max_length=16)
    imap_username: str | None = Field(default=None, max_length=320)
    imap_password_ciphertext: str | None = Field(default=None, max_length=4096)
    imap_last_poll_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    imap_last_poll_error: str | None = Field(default=None, max_length=512)
    # The scheduler's last count of the server's bounce and complaint rates, sent with a poll
    # report (`MailboxPoll.reputation`); not copied, so not a change the copies hear of.
    reputation_sample: int | None = None
    reputation_bounce_rate: float | None = None
    reputation_complaint_rate: float | None = None
    reputation_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # Raised by every change the copies of other services hear of (`services.registry.changes`).
    version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = Field(
        default_factory=utcnow,
        sa_type=UtcDateTime,
    )
    updated_at: datetime = Field(
        default_factory=utcnow,
        sa_type=UtcDateTime,
    )

    def imap_public(self) -> ImapPublic | None:
        if self.imap_host is None or self.imap_port is None or self.imap_username is None:
            return None
        return ImapPublic(
            host=self.imap_host,
            port=self.imap_port,
            security=ImapSecurity(self.imap_security or "tls"),
            username=self.imap_username,
            last_poll_at=self.imap_last_poll_at,
            last_poll_error=self.imap_last_poll_error,
        )

    def reputation_public(self) -> ServerReputation | None:
        if self.reputation_at is None or self.reputation_sample is None:
            return None
        return ServerReputation(
            sample=self.reputation_sample,
            bounce_rate=self.reputation_bounce_rate,
            complaint_rate=self.reputation_complaint_rate,
            at=self.reputation_at,
        )

    def provider_key(self) -> str | None:
        """The stored provider; for a row stored before it was, the one its host names."""
        provider = provider_of(self.provider, self.host, self.username)
        return provider.key if provider else None

    def record_check(self, outcome: CheckOutcome, now: datetime) -> None:
        """A connection check's outcome, whoever ran it: the last check, and the status it
        means (a pause by hand wins)."""
        self.last_check_code = outcome.code.value if outcome.code else None
        self.last_check_reply = (outcome.reply or outcome.detail)[:512]
        self.last_checked_at = now
        self.status = settled_status(ServerStatus(self.status), status_after_check(outcome))
        self.updated_at = now

    def to_public(self) -> SmtpServerPublic:
        return SmtpServerPublic(
            id=self.id,
            label=self.label,
            host=self.host,
            port=self.port,
            security=Security(self.security),
            username=self.username,
            from_email=self.from_email,
            from_name=self.from_name,
            daily_cap=self.daily_cap,
            status=ServerStatus(self.status),
            auth=AuthMethod(self.auth),
            oauth_provider=self.oauth_provider,
            has_password=AuthMethod(self.auth) is AuthMethod.password,
            provider=self.provider_key(),
            last_check=LastCheck(
                ok=self.last_check_code is None and self.last_checked_at is not None,
                code=self.last_check_code,
                reply=self.last_check_reply,
                at=self.last_checked_at,
                hint=status_hint(
                    self.last_check_code,
                    self.last_check_reply,
                    AuthMethod(self.auth),
                    self.oauth_provider,
                ),
            ),
            status_reason=self.status_reason,
            imap=self.imap_public(),
            reputation=self.reputation_public(),
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


class OAuthStart(SQLModel):
    """What the tenant may set on the server it connects; the rest comes from the provider."""

    model_config = SQLModelConfig(hide_input_in_errors=True)

    label: OneLineText = Field(default="", max_length=100)
    from_name: OneLineText = Field(default="", max_length=100)
    daily_cap: DailyCap = Field(default=DEFAULT_DAILY_CAP)
    server_id: uuid.UUID | None = Field(
        default=None,
        description="Reconnect this existing server (after `auth_failed`) instead of adding one.",
    )
    imap: OAuthImap | None = Field(
        default=None,
        description="Also read the mailbox (bounces, replies) with the same grant: checked at "
        "the callback (AUTHENTICATE XOAUTH2, SELECT INBOX, LOGOUT) like the SMTP side.",
    )

    _clean_label = field_validator("label", "from_name")(_clean_text)


class OAuthStarted(SQLModel):
    authorize_url: str = Field(description="Send the tenant's browser here.")
    state: str = Field(description="Ties the callback to this start; single use, short-lived.")
    expires_at: datetime


class OAuthFlowStatus(SQLModel):
    status: Literal["pending", "connected", "failed", "expired"]
    server_id: uuid.UUID | None = None
    error: str | None = None


class OAuthFlow(SQLModel, table=True):
    """One started connection, until its callback: single use, bound to its tenant.

    The PKCE verifier is kept here (encrypted), never in the browser; the row is kept after use
    with its outcome, so `ablctl` can learn it and a replayed state is refused.
    """

    __tablename__ = "oauth_flows"

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    tenant_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    provider: str = Field(max_length=32)
    verifier_ciphertext: str = Field(max_length=512)
    server_id: uuid.UUID | None = None
    label: str = Field(default="", max_length=100)
    from_name: str = Field(default="", max_length=100)
    daily_cap: int = Field(default=MAX_DAILY_CAP)
    # The start's `imap`: read the mailbox with the grant (checked at the callback).
    read_mailbox: bool = Field(default=False)
    imap_port: int | None = None
    imap_security: str | None = Field(default=None, max_length=16)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    expires_at: datetime = Field(sa_type=UtcDateTime, index=True)
    used_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    result_server_id: uuid.UUID | None = None
    result_error: str | None = Field(default=None, max_length=64)


class RegistryOutbox(OutboxRecord, table=True):
    """Events of the registry (a server's status changed), published after commit."""

    __tablename__ = "registry_outbox"


class RegistryChangesOutbox(OutboxRecord, table=True):
    """Changes of tenants and servers for the services that keep a copy of them
    (`shared/registry_changes.py`), published after commit to each one's queue."""

    __tablename__ = "registry_changes_outbox"
