"""Schemas of the messages the services exchange: over the broker (jobs, results, cancels) and
over the internal HTTP routes (credentials, the senders' questions and reports), written once
here and imported by the route and its client alike. The registry's changes are in
`shared/registry_changes.py`, the webhooks' events in `shared/events.py`.

A message names servers and emails by id; it never carries a password or an API key, except
the credentials answers of the internal routes, which are never put on the broker.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.errors import PermanentMessageError

SCHEMA_VERSION = 1

ModelT = TypeVar("ModelT", bound="MessageBody")


class MessageBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = SCHEMA_VERSION


class EmailContent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    to: str
    subject: str
    text: str | None = None
    html: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    message_id: str = Field(description="Stays the same on every retry of the email.")
    unsubscribe_url: str | None = Field(
        default=None, description="One-click unsubscribe link (RFC 8058), signed per recipient."
    )
    unsubscribe_token: str | None = Field(
        default=None, description="The same token, for the mailto: variant's subject."
    )
    date: datetime | None = Field(
        default=None,
        description="The Date header: when the email was accepted, the same on every attempt "
        "(RFC 5322 3.6.1: when it was ready to enter the mail system).",
    )


class SendJob(MessageBody):
    job_id: uuid.UUID
    email_id: uuid.UUID
    tenant_id: uuid.UUID
    server_id: uuid.UUID
    attempt: int = Field(ge=1)
    reserved_day: str = Field(description="The allowance day the reservation was taken from.")
    content: EmailContent
    not_before: datetime | None = None
    republished: bool = Field(
        default=False,
        description="Published again after its lease: a copy may exist, so the sender checks "
        "with the scheduler before sending.",
    )


class Outcome(StrEnum):
    sent = "sent"
    failed = "failed"
    retry = "retry"
    unknown = "unknown"


class SendResult(MessageBody):
    job_id: uuid.UUID
    email_id: uuid.UUID
    tenant_id: uuid.UUID
    server_id: uuid.UUID
    attempt: int = Field(ge=1)
    outcome: Outcome
    smtp_code: int | None = None
    smtp_reply: str | None = Field(default=None, max_length=1000)
    data_completed: bool = Field(
        description="The server saw the final '.'; if false the reservation is given back."
    )
    server_problem: str | None = Field(
        default=None, description="auth_failed, quota, ...: the server needs attention."
    )
    finished_at: datetime


class CancelNotice(MessageBody):
    """Broadcast to every sender: this scheduled email was canceled; skip its job."""

    email_id: uuid.UUID
    job_id: uuid.UUID


class ServerAccess(BaseModel):
    """How to log in to one of a tenant's mail servers, as the registry's internal endpoints
    give it out: HTTP only, never on the broker; the repr never shows the password or the
    token. A server connected with OAuth (`auth: xoauth2`) comes with a short-lived access
    token only (null when its grant is gone): the refresh token never leaves the registry."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    host: str
    port: int
    security: Literal["starttls", "tls"]
    username: str
    auth: Literal["password", "xoauth2"] = "password"
    password: str = Field(default="", repr=False)
    access_token: str | None = Field(default=None, repr=False)
    access_token_expires_at: datetime | None = None


class SmtpCredentials(ServerAccess):
    """One server's SMTP submission access and sending identity, for a sender (the login
    fields and their rules: `ServerAccess`; an OAuth server's comes with an access token only)."""

    from_email: str
    from_name: str
    status: str = Field(description="The registry's status; only `active` servers send.")
    daily_cap: int
    per_minute: int | None = Field(
        default=None,
        description="The provider's limit of messages a minute (Microsoft 365: 30), which the "
        "sender holds; null when it has none.",
    )


class ImapCredentials(ServerAccess):
    """One server's mailbox access, for the scheduler's mailbox reader (the login fields and
    their rules: `ServerAccess`; an OAuth server's comes with an access token only)."""


class PollReputation(BaseModel):
    """What came back from the server's recent emails, as the scheduler counts them for the
    bounce-rate guard (the same numbers as `reputation` on `GET /v1/servers/{id}/warmup`)."""

    model_config = ConfigDict(extra="forbid")

    sample: int = Field(
        ge=0, description="Emails that left among the server's last `ABL_BOUNCE_WINDOW`."
    )
    bounce_rate: float | None = Field(
        ge=0, le=1, description="Hard bounces / sample; null when the sample is empty."
    )
    complaint_rate: float | None = Field(
        ge=0, le=1, description="Complaints / sample; null when the sample is empty."
    )


class MailboxPoll(BaseModel):
    """The mailbox reader's report of one read of a server's INBOX. `reputation` is optional:
    a reader of an older version reports without it (the stored one is then kept), and so does
    a reader that could not count."""

    model_config = ConfigDict(extra="forbid")

    polled_at: datetime
    error: str | None = Field(default=None, max_length=512)
    reputation: PollReputation | None = None


class BouncePause(BaseModel):
    """The bounce-rate guard's request to pause a server (`paused_bounces`)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=512)


def parse(model: type[ModelT], body: bytes) -> ModelT:
    """Parse a message, or raise PermanentMessageError so that it is dead-lettered."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise PermanentMessageError(
            f"unparsable {model.__name__}: {exc.error_count()} error(s)"
        ) from exc


# The senders' questions and reports to the scheduler (`/internal/v1/jobs/sendable`, `/results`)
# and to the registry (`/internal/v1/servers/{id}/health`).
MAX_JOBS_PER_QUESTION = 1000


class JobRef(BaseModel):
    email_id: uuid.UUID
    job_id: uuid.UUID


class SendableQuery(BaseModel):
    jobs: list[JobRef] = Field(max_length=MAX_JOBS_PER_QUESTION)


class SendableAnswer(BaseModel):
    sendable: list[uuid.UUID]


class ResultsReport(BaseModel):
    results: list[SendResult] = Field(max_length=MAX_JOBS_PER_QUESTION)


# A results message: a `ResultsReport` of several (what senders publish), or one bare
# `SendResult` (what senders published before they batched, still accepted during an upgrade).
_RESULTS_MESSAGE: TypeAdapter[ResultsReport | SendResult] = TypeAdapter(ResultsReport | SendResult)


def parse_results(body: bytes) -> list[SendResult]:
    """The results a results message holds, or PermanentMessageError (dead-lettered)."""
    try:
        parsed = _RESULTS_MESSAGE.validate_json(body)
    except ValidationError as exc:
        raise PermanentMessageError(
            f"unparsable results message: {exc.error_count()} error(s)"
        ) from exc
    return parsed.results if isinstance(parsed, ResultsReport) else [parsed]


class ResultsApplied(BaseModel):
    applied: list[bool]


class HealthReport(BaseModel):
    """A sender saw the server refuse its login: the one report of it (the registry decides)."""

    status: Literal["auth_failed"]
    reply: str = Field(max_length=1000)
