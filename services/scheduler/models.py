"""The scheduler's tables and API shapes: emails, per-day allowances, warmup, sending profiles."""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime
from enum import StrEnum
from importlib.resources import files
from typing import Annotated, Any

from annotated_types import Interval
from pydantic import JsonValue, WithJsonSchema, field_validator, model_validator
from sqlalchemy import JSON, Column, Date, Index, UniqueConstraint
from sqlmodel import Field, SQLModel
from sqlmodel._compat import SQLModelConfig

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


class EmailStatus(StrEnum):
    queued = "queued"
    scheduled = "scheduled"
    sent = "sent"
    failed = "failed"
    unknown = "unknown"
    canceled = "canceled"


FINAL_STATUSES = frozenset(
    {EmailStatus.sent, EmailStatus.failed, EmailStatus.unknown, EmailStatus.canceled}
)


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
    idempotency_key: OneLineText | None = Field(default=None, min_length=1, max_length=200)

    _clean = field_validator("subject", "campaign", "idempotency_key")(_clean_line)

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
        return self


class MessageBatch(SQLModel):
    messages: list[EmailCreate] = Field(min_length=1, max_length=MAX_BATCH)


class Accepted(SQLModel):
    ids: list[uuid.UUID]
    queued: int
    duplicates: int = Field(description="Items whose idempotency key was seen before.")
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


class WarmupPublic(SQLModel):
    server_id: uuid.UUID
    status: str
    step: int
    top_step: int
    allowance_today: int
    sent_today: int
    reserved_today: int
    remaining_today: int
    rolling_24h_used: int
    parked_until: datetime | None
    next_send_at: datetime | None
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


class SchedulerOutbox(OutboxRecord, table=True):
    """Events of the scheduler (an email's final status, a server parked or back, a warmup
    step), written in the transaction that makes the change, published after commit."""

    __tablename__ = "scheduler_outbox"
