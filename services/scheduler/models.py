"""The scheduler's tables and API shapes: emails, per-day allowances, warmup, sending profiles."""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime
from enum import StrEnum
from importlib.resources import files
from typing import Annotated, Any

import idna
from annotated_types import Interval
from pydantic import JsonValue, StrictBool, WithJsonSchema, field_validator, model_validator
from sqlalchemy import JSON, BigInteger, Column, Date, Index, String, UniqueConstraint
from sqlmodel import Field, SQLModel
from sqlmodel._compat import SQLModelConfig

from services.scheduler.lifecycle import EmailStatus as EmailStatus
from shared.copies import CopyRecord, CopyStateRecord, TenantCopyRecord
from shared.outbox import OutboxRecord
from shared.timeutil import UtcDateTime, new_id, utcnow
from shared.validation import (
    HEADER_VALUE_PATTERN,
    JSON_INTEGER,
    NO_NUL_PATTERN,
    Address,
    OneLineText,
    SchemaPattern,
    refuse_control_chars,
    refuse_unencodable,
)

MAX_BATCH = 1000
MAX_TEXT_BYTES = 512 * 1024
MAX_HTML_BYTES = 1024 * 1024
MAX_HEADERS = 50
HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # printable ASCII without ':' (RFC 5322)
# Set by the platform from the server and the email; a tenant may not override them.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "reply-to",
        "sender",
        "return-path",
        "received",
        "content-type",
        "content-transfer-encoding",
        "mime-version",
        "dkim-signature",
    }
)


def _any_case(word: str) -> str:
    # JSON Schema patterns have no case-insensitive flag that every engine reads.
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# What `EmailCreate._headers` checks, for the spec.
HeaderMap = Annotated[
    dict[str, str],
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": MAX_HEADERS,
            "propertyNames": {
                "pattern": HEADER_NAME.pattern,
                "not": {
                    "pattern": "^(?:"
                    + "|".join(_any_case(name) for name in sorted(RESERVED_HEADERS))
                    + ")$"
                },
            },
            "additionalProperties": {
                "type": "string",
                "maxLength": 998,
                "pattern": HEADER_VALUE_PATTERN,
            },
            "description": (
                "Extra headers (`List-Unsubscribe`, `X-Campaign`, ...): printable ASCII names "
                "without ':', values on one line. The platform sets From, To, Subject, Date, "
                "Message-ID, Reply-To and the MIME headers itself."
            ),
        }
    ),
]
BodyText = Annotated[str, SchemaPattern(NO_NUL_PATTERN)]
# The IANA zone names of the pinned `tzdata` package: the same list on every machine, so the
# spec can list them, and every one of them loads whatever the system's own zone files hold.
TIME_ZONES = frozenset(files("tzdata").joinpath("zones").read_text().split())
TimeZoneName = Annotated[
    str,
    WithJsonSchema(
        {
            "type": "string",
            "enum": sorted(TIME_ZONES),
            "description": "An IANA time zone name, e.g. Europe/Paris.",
        }
    ),
]


def _clean_line(value: str | None) -> str | None:
    return None if value is None else refuse_control_chars(value)


class EmailBase(SQLModel):
    # Plain strings here: the addresses were checked on the way in (EmailCreate) and are
    # stored in ASCII form, which EmailStr would turn back into Unicode on the way out.
    to: str = Field(max_length=320)
    subject: OneLineText = Field(max_length=998)
    text: BodyText | None = Field(default=None)
    html: BodyText | None = Field(default=None)
    reply_to: str | None = Field(default=None, max_length=320)
    campaign: OneLineText | None = Field(default=None, max_length=100)
    sequence: OneLineText | None = Field(
        default=None,
        max_length=100,
        description="Emails of one sequence to one recipient: a reply or a bounce cancels "
        "the ones still queued.",
    )


def _refuse_own_unsubscribe_header(headers: dict[str, str]) -> None:
    if any(name.lower() in ("list-unsubscribe", "list-unsubscribe-post") for name in headers):
        raise ValueError(
            "`unsubscribe: true` sets List-Unsubscribe itself: drop the header or the flag"
        )


class EmailCreate(EmailBase):
    # The spec says what `_has_body` checks: a non-empty `text` or `html`.
    model_config = SQLModelConfig(
        json_schema_extra={
            "anyOf": [
                {"required": ["text"], "properties": {"text": {"type": "string", "minLength": 1}}},
                {"required": ["html"], "properties": {"html": {"type": "string", "minLength": 1}}},
            ]
        }
    )
    # Addresses in the form the sender puts on the wire: ASCII local part, IDNA domain.
    to: Address = Field(max_length=320)
    reply_to: Address | None = Field(default=None, max_length=320)
    headers: HeaderMap = Field(default_factory=dict)
    idempotency_key: OneLineText | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="The tenant's own key for this email: an email whose key the tenant already "
        "used is not stored again (its item is `duplicate`, with the first email's id), so a "
        "batch sent again after a timeout queues nothing twice.",
    )
    unsubscribe: StrictBool = Field(
        default=False,
        description="Add a one-click List-Unsubscribe (RFC 8058) with a link signed for this "
        "recipient, and a mailto: variant to the sending mailbox.",
    )

    _clean = field_validator("subject", "campaign", "idempotency_key", "sequence")(_clean_line)

    @field_validator("text")
    @classmethod
    def _text_size(cls, value: str | None) -> str | None:
        if value is not None and len(refuse_unencodable(value).encode()) > MAX_TEXT_BYTES:
            raise ValueError(f"must be at most {MAX_TEXT_BYTES} bytes")
        return value

    @field_validator("html")
    @classmethod
    def _html_size(cls, value: str | None) -> str | None:
        if value is not None and len(refuse_unencodable(value).encode()) > MAX_HTML_BYTES:
            raise ValueError(f"must be at most {MAX_HTML_BYTES} bytes")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        # Errors say which header by its position, never by its name: no error repeats input.
        if len(value) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers")
        for position, (name, header_value) in enumerate(value.items(), start=1):
            if not HEADER_NAME.match(name):
                raise ValueError(
                    f"header {position}: the name must be 1 to 76 printable ASCII characters "
                    "without ':'"
                )
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {position}: this header is set by the platform")
            if len(header_value) > 998:
                raise ValueError(f"header {position}: the value is longer than 998 characters")
            try:
                refuse_control_chars(header_value, allow_tab=True)
            except ValueError as exc:
                raise ValueError(f"header {position}: the value {exc}") from None
        return value

    @model_validator(mode="after")
    def _has_body(self) -> EmailCreate:
        if not self.text and not self.html:
            raise ValueError("give `text`, `html` or both")
        if self.unsubscribe:
            _refuse_own_unsubscribe_header(self.headers)
        return self


class MessageBatch(SQLModel):
    messages: list[EmailCreate] = Field(min_length=1, max_length=MAX_BATCH)
    unsubscribe: StrictBool = Field(
        default=False, description="One-click unsubscribe on every email of the batch."
    )

    @model_validator(mode="after")
    def _unsubscribe_header(self) -> MessageBatch:
        if self.unsubscribe:
            for message in self.messages:
                message.unsubscribe = True
                _refuse_own_unsubscribe_header(message.headers)
        return self


class ItemStatus(StrEnum):
    queued = "queued"
    duplicate = "duplicate"
    suppressed = "suppressed"


class AcceptedItem(SQLModel):
    id: uuid.UUID
    status: ItemStatus = Field(
        description="`queued`; `duplicate` (the idempotency key was seen before: the first "
        "email's id); `suppressed` (the recipient is on the suppression list: stored with "
        "status `suppressed`, never sent)."
    )


class Accepted(SQLModel):
    ids: list[uuid.UUID]
    items: list[AcceptedItem] = Field(description="One per item of the request, in order.")
    queued: int
    duplicates: int = Field(description="Items whose idempotency key was seen before.")
    suppressed: int = Field(
        default=0, description="Items refused because their recipient is suppressed."
    )
    active_servers: int
    warning: str | None = None


class EmailPublic(EmailBase):
    id: uuid.UUID
    status: EmailStatus
    headers: dict[str, str]
    idempotency_key: str | None
    message_id: str
    server_id: uuid.UUID | None
    attempts: int
    not_before: datetime
    last_smtp_code: int | None
    last_smtp_reply: str | None
    unsubscribe: bool
    unsubscribed_at: datetime | None
    bounce_status: str | None = Field(description="The DSN's status code, e.g. 5.1.1.")
    bounce_diagnostic: str | None
    replied_at: datetime | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None


class EmailPage(SQLModel):
    items: list[EmailPublic]
    next_cursor: str | None


class Email(EmailBase, table=True):
    __tablename__ = "emails"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_emails_idempotency"),
        Index("ix_emails_due", "status", "not_before"),
        Index("ix_emails_tenant_status", "tenant_id", "status", "id"),
        # A server's last sent emails (the bounce-rate guard, the reputation its mailbox
        # reader reports after every read, /warmup): an index range, not a sort of them all.
        Index("ix_emails_server_sent", "server_id", "sent_at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    tenant_id: uuid.UUID = Field(index=True)
    status: str = Field(default=EmailStatus.queued, max_length=16)
    headers: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    idempotency_key: str | None = Field(default=None, max_length=200)
    message_id: str = Field(max_length=255)
    attempts: int = 0
    not_before: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    server_id: uuid.UUID | None = Field(default=None, index=True)
    job_id: uuid.UUID | None = None
    reserved_day: date | None = Field(default=None, sa_type=Date)
    reserved_hour: datetime | None = Field(default=None, sa_type=UtcDateTime)
    lease_until: datetime | None = Field(default=None, sa_type=UtcDateTime)
    published_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_smtp_code: int | None = None
    last_smtp_reply: str | None = Field(default=None, max_length=1000)
    unsubscribe: bool = False
    unsubscribed_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    bounce_status: str | None = Field(default=None, max_length=16)
    bounce_diagnostic: str | None = Field(default=None, max_length=1000)
    replied_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    sent_at: datetime | None = Field(default=None, sa_type=UtcDateTime)

    def to_public(self) -> EmailPublic:
        return EmailPublic.model_validate(self, from_attributes=True)


class ServerDay(SQLModel, table=True):
    """One server's allowance and use on one local day. The reservation guard lives here."""

    __tablename__ = "server_days"

    server_id: uuid.UUID = Field(primary_key=True)
    day: date = Field(primary_key=True, sa_type=Date)
    tenant_id: uuid.UUID = Field(index=True)
    allowance: int
    reserved: int = 0
    sent: int = 0


class ServerUsageHour(SQLModel, table=True):
    """Reservations per server per UTC hour, for the rolling 24-hour limit."""

    __tablename__ = "server_usage_hours"

    server_id: uuid.UUID = Field(primary_key=True)
    hour: datetime = Field(primary_key=True, sa_type=UtcDateTime)
    used: int = 0


class ServerWarmup(SQLModel, table=True):
    __tablename__ = "server_warmup"

    server_id: uuid.UUID = Field(primary_key=True)
    tenant_id: uuid.UUID = Field(index=True)
    step: int = 1
    state_day: date = Field(sa_type=Date)
    idle_days: int = 0
    parked_until: datetime | None = Field(default=None, sa_type=UtcDateTime)
    park_reason: str | None = Field(default=None, max_length=200)
    # The next slot of a server whose provider limits sends per minute (domain.minute_budget).
    pace_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


def _hours_in_order() -> list[JsonValue]:
    """`_ordered` as JSON Schema: with both hours given, end_hour is after start_hour (either
    alone is always in order with the other's default, 0 or 24)."""
    branches: list[JsonValue] = [{"not": {"required": ["start_hour", "end_hour"]}}]
    for start in range(24):
        branches.append(
            {"properties": {"start_hour": {"const": start}, "end_hour": {"minimum": start + 1}}}
        )
    return branches


class SendingProfileBase(SQLModel):
    time_zone: TimeZoneName = Field(default="UTC", max_length=64)
    # JSON integers only: `false` or `"9"` is not an hour.
    start_hour: Annotated[int, Interval(ge=0, le=23), JSON_INTEGER] = 0
    end_hour: Annotated[int, Interval(ge=1, le=24), JSON_INTEGER] = 24

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value not in TIME_ZONES:
            raise ValueError("unknown IANA time zone, e.g. 'Europe/Paris'")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> SendingProfileBase:
        if self.end_hour <= self.start_hour:
            raise ValueError("end_hour must be after start_hour")
        return self


class SendingProfileUpdate(SendingProfileBase):
    model_config = SQLModelConfig(json_schema_extra={"anyOf": _hours_in_order()})


class SendingProfilePublic(SendingProfileBase):
    tenant_id: uuid.UUID


class SendingProfile(SendingProfileBase, table=True):
    __tablename__ = "sending_profiles"

    tenant_id: uuid.UUID = Field(primary_key=True)


class WarmupDay(SQLModel):
    day: date
    step: int
    allowance: int


class ReputationPublic(SQLModel):
    """What came back from the server's recent emails, as the bounce-rate guard sees it."""

    sample: int = Field(
        description="Emails that left among the server's last `ABL_BOUNCE_WINDOW` (rates are "
        "over these)."
    )
    bounce_rate: float | None = Field(description="Hard bounces / sample; null before a send.")
    complaint_rate: float | None = Field(description="Complaints / sample; null before a send.")
    bounce_pause_ratio: float = Field(description="Above this bounce rate the server pauses.")
    complaint_pause_ratio: float = Field(description="Above this complaint rate it pauses.")
    bounced_today: int = Field(description="Of today's sent emails, how many bounced hard.")
    climb_held_today: bool = Field(
        description="Today's bounce rate is above half the pause ratio: the warmup step does "
        "not climb tomorrow."
    )


class WarmupPublic(SQLModel):
    server_id: uuid.UUID
    status: str
    step: int
    top_step: int
    provider: str | None = Field(
        description="The provider the registry stored at the server's check, told from the "
        "SMTP host, its CNAME chain or the MX records of the account's domain (gmail, "
        "google_workspace, office365, outlook, zoho, yahoo, icloud, fastmail), or null for an "
        "unknown server."
    )
    daily_limit: int = Field(
        description="The top of the ramp: the lowest of daily_cap and the provider's limit."
    )
    per_minute_limit: int | None = Field(
        description="The provider's per-minute limit, enforced by spacing sends."
    )
    allowance_today: int
    sent_today: int
    reserved_today: int
    remaining_today: int
    rolling_24h_used: int
    parked_until: datetime | None
    next_send_at: datetime | None
    reputation: ReputationPublic
    projection: list[WarmupDay]


class CapacityPublic(SQLModel):
    monthly_emails: int
    days: int
    per_server_first_month: int
    per_server_steady_month: int
    minimum_servers: int
    recommended_servers: int
    steady_state_servers: int
    headroom: float
    active_servers: int


# --- suppression list -----------------------------------------------------------------------


class SuppressionSource(StrEnum):
    bounce = "bounce"
    complaint = "complaint"
    unsubscribe = "unsubscribe"
    manual = "manual"


_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def clean_domain(value: str) -> str:
    """A domain in the form emails carry it: lower case, IDNA (`xn--`) for a Unicode one."""
    cleaned = refuse_control_chars(value).strip().lower().removesuffix(".")
    if not cleaned.isascii():
        try:
            cleaned = idna.encode(cleaned, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError("is not a valid internationalised domain") from exc
    labels = cleaned.split(".")
    if len(cleaned) > 253 or len(labels) < 2 or not all(map(_DOMAIN_LABEL.match, labels)):
        raise ValueError("must be a domain such as example.com")
    return cleaned


class SuppressionBase(SQLModel):
    address: str | None = Field(default=None, max_length=320)
    domain: str | None = Field(default=None, max_length=253)
    reason: str = Field(default="", max_length=500)
    source: SuppressionSource = SuppressionSource.manual


class SuppressionCreate(SuppressionBase):
    """One address or one whole domain; matching ignores case."""

    address: Address | None = Field(default=None, max_length=320)

    _clean_reason = field_validator("reason")(_clean_line)

    @field_validator("address")
    @classmethod
    def _lower_address(cls, value: str | None) -> str | None:
        return None if value is None else value.lower()

    @field_validator("domain")
    @classmethod
    def _clean_domain(cls, value: str | None) -> str | None:
        return None if value is None else clean_domain(value)

    @model_validator(mode="after")
    def _one_of(self) -> SuppressionCreate:
        if (self.address is None) == (self.domain is None):
            raise ValueError("give exactly one of `address` or `domain`")
        return self


class SuppressionBatch(SQLModel):
    items: list[SuppressionCreate] = Field(min_length=1, max_length=MAX_BATCH)


class SuppressionImported(SQLModel):
    added: int
    already_known: int


class SuppressionPublic(SuppressionBase):
    id: uuid.UUID
    source: SuppressionSource
    created_at: datetime


class SuppressionPage(SQLModel):
    items: list[SuppressionPublic]
    next_cursor: str | None


class Suppression(SuppressionBase, table=True):
    __tablename__ = "suppressions"
    __table_args__ = (
        UniqueConstraint("tenant_id", "address", name="uq_suppressions_address"),
        UniqueConstraint("tenant_id", "domain", name="uq_suppressions_domain"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    tenant_id: uuid.UUID = Field(index=True)
    source: SuppressionSource = Field(default=SuppressionSource.manual, sa_type=String(16))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)

    def to_public(self) -> SuppressionPublic:
        return SuppressionPublic.model_validate(self, from_attributes=True)


# --- mailbox reading --------------------------------------------------------------------------


class MailboxCursor(SQLModel, table=True):
    """Where the mailbox reader stands in one server's INBOX."""

    __tablename__ = "mailbox_cursors"

    server_id: uuid.UUID = Field(primary_key=True)
    tenant_id: uuid.UUID = Field(index=True)
    uidvalidity: int = Field(default=0, sa_type=BigInteger)
    last_uid: int = Field(default=0, sa_type=BigInteger)
    # Until when one replica holds the mailbox (while it reads it), then when it is next due:
    # replicas split the mailboxes instead of each reading every one.
    due_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # A `paused_bounces` pause the bounce-rate guard decided (its reason), written in the read's
    # transaction and cleared once the registry took it; until then every replica's every
    # round asks the registry again, across restarts.
    pending_pause: str | None = Field(default=None, max_length=512)
    pending_pause_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class MailboxEvent(SQLModel, table=True):
    """One notification read from a mailbox, recorded once whatever re-reads it."""

    __tablename__ = "mailbox_events"
    __table_args__ = (
        UniqueConstraint("tenant_id", "key", name="uq_mailbox_events_key"),
        Index("ix_mailbox_events_address", "tenant_id", "address", "kind", "at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    tenant_id: uuid.UUID
    server_id: uuid.UUID = Field(index=True)
    key: str = Field(max_length=255)
    kind: str = Field(max_length=16)
    email_id: uuid.UUID | None = None
    address: str | None = Field(default=None, max_length=320)
    status: str | None = Field(default=None, max_length=16)
    at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class SchedulerOutbox(OutboxRecord, table=True):
    """Events of the scheduler (an email's final status, a server parked or back, a warmup
    step), written in the transaction that makes the change, published after commit."""

    __tablename__ = "scheduler_outbox"


class SchedulerTenant(TenantCopyRecord, table=True):
    """The scheduler's copy of the registry's tenants: enough to tell whose an API key is."""

    __tablename__ = "scheduler_tenants"


class SchedulerCopyState(CopyStateRecord, table=True):
    """When the scheduler's copy last held a whole snapshot of the registry."""

    __tablename__ = "scheduler_copy_state"


class SchedulerServer(CopyRecord, table=True):
    """The scheduler's copy of what it needs of the registry's servers: which may send, their
    caps and providers, which have a mailbox to read (`services.scheduler.registry_copy`)."""

    __tablename__ = "scheduler_servers"

    tenant_id: uuid.UUID = Field(index=True)
    status: str = Field(max_length=32)
    daily_cap: int
    label: str = Field(default="", max_length=100)
    host: str = Field(default="", max_length=253)
    username: str = Field(default="", max_length=320)
    provider: str | None = Field(default=None, max_length=32)
    reads_mailbox: bool = Field(default=False)
