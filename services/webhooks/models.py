"""Webhook endpoints, the events they are sent, and each delivery's state: the webhooks
service's own tables, and the shapes its API reads and writes.

A Public model never holds the signing secret; the table holds it only encrypted. It is shown
once, in `WebhookEndpointCreated`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import StrictBool, field_validator
from sqlalchemy import JSON, Column, ForeignKey, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.copies import CopyStateRecord, TenantCopyRecord
from shared.events import EventType
from shared.timeutil import UtcDateTime, new_id, utcnow
from shared.validation import OneLineText, SchemaPattern, refuse_control_chars

URL_MAX = 2048
# The spec says what the API accepts: an absolute URL on one line (http:// only where
# ABL_ALLOW_PRIVATE_HOSTS allows it; production answers 422 insecure_url).
HttpsUrl = Annotated[
    str,
    SchemaPattern(
        r"^https?://[^\s\x00-\x1f\x7f-\x9f\u2028\u2029/?#]+([/?#][^\s\x00-\x1f\x7f-\x9f\u2028\u2029]*)?$"
    ),
]
# What a tenant may subscribe to; the service's own notices (endpoint disabled) go to every
# enabled endpoint of the tenant whatever it chose, as a status change of its own setup.
SUBSCRIBABLE = tuple(t for t in EventType if t is not EventType.webhook_endpoint_disabled)


class DeliveryStatus(StrEnum):
    pending = "pending"  # waiting for its next attempt
    delivered = "delivered"  # the endpoint answered 2xx
    failed = "failed"  # every attempt failed for the whole retry window; redeliver by hand


def clean_url(value: object) -> object:
    # Anything but a string is left to the field's type check, which answers 422.
    return refuse_control_chars(value).strip() if isinstance(value, str) else value


def unique_types(value: list[EventType] | None) -> list[EventType] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("must name at least one event type")
    return list(dict.fromkeys(value))


class WebhookEndpointBase(SQLModel):
    url: HttpsUrl = Field(max_length=URL_MAX, description="HTTPS URL that receives the events.")
    description: OneLineText = Field(default="", max_length=200)
    enabled: StrictBool = True


class WebhookEndpointCreate(WebhookEndpointBase):
    event_types: list[EventType] = Field(
        default_factory=lambda: list(SUBSCRIBABLE),
        min_length=1,
        description="The event types this endpoint receives; every type when omitted.",
    )

    @field_validator("url", mode="before")
    @classmethod
    def _clean_url(cls, value: object) -> object:
        return clean_url(value)

    @field_validator("event_types")
    @classmethod
    def _unique_types(cls, value: list[EventType]) -> list[EventType] | None:
        return unique_types(value)

    @field_validator("description")
    @classmethod
    def _clean_description(cls, value: str) -> str:
        return refuse_control_chars(value).strip()


class WebhookEndpointUpdate(SQLModel):
    url: HttpsUrl | None = Field(default=None, max_length=URL_MAX)
    description: OneLineText | None = Field(default=None, max_length=200)
    enabled: StrictBool | None = None
    event_types: list[EventType] | None = Field(default=None, min_length=1)

    @field_validator("url", mode="before")
    @classmethod
    def _clean_url(cls, value: object) -> object:
        return clean_url(value)

    @field_validator("event_types")
    @classmethod
    def _unique_types(cls, value: list[EventType] | None) -> list[EventType] | None:
        return unique_types(value)

    @field_validator("description")
    @classmethod
    def _clean_description(cls, value: str | None) -> str | None:
        return None if value is None else refuse_control_chars(value).strip()


class WebhookEndpointPublic(WebhookEndpointBase):
    id: uuid.UUID
    event_types: list[EventType]
    disabled_reason: str | None = Field(
        default=None, description="Why the service disabled the endpoint (it failed for days)."
    )
    failing_since: datetime | None = Field(
        default=None, description="First failed attempt since the last success."
    )
    previous_secret_until: datetime | None = Field(
        default=None,
        description="After a rotation: until then, deliveries carry a signature with the "
        "previous secret too (`webhook-signature` holds both).",
    )
    created_at: datetime
    updated_at: datetime


class WebhookEndpointCreated(WebhookEndpointPublic):
    secret: str = Field(
        description="The signing secret (`whsec_...`), shown once: verify `webhook-signature` "
        "with it (Standard Webhooks)."
    )


class WebhookEndpointPage(SQLModel):
    items: list[WebhookEndpointPublic]
    next_cursor: str | None = None


class WebhookEndpoint(WebhookEndpointBase, table=True):
    __tablename__ = "webhook_endpoints"

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    # No foreign key to the registry's tenants table: each service owns its tables.
    tenant_id: uuid.UUID = Field(index=True)
    event_types: list[str] = Field(sa_column=Column(JSON, nullable=False))
    secret_ciphertext: str = Field(max_length=512)
    # The secret a rotation replaced, still signing beside the new one until the time given.
    previous_secret_ciphertext: str | None = Field(default=None, max_length=512)
    previous_secret_until: datetime | None = Field(default=None, sa_type=UtcDateTime)
    disabled_reason: str | None = Field(default=None, max_length=200)
    failing_since: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class WebhookMessage(SQLModel, table=True):
    """One event, with the exact bytes every endpoint receives (the signature covers them)."""

    __tablename__ = "webhook_messages"

    id: str = Field(primary_key=True, max_length=64)
    tenant_id: uuid.UUID = Field(index=True)
    type: str = Field(max_length=64)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class WebhookDeliveryBase(SQLModel):
    status: DeliveryStatus = DeliveryStatus.pending
    attempts: int = 0
    last_status_code: int | None = Field(default=None, description="The endpoint's last answer.")
    last_error: str | None = Field(
        default=None, max_length=200, description="`timeout`, `connect_failed`, ... or null."
    )
    last_attempt_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class WebhookDeliveryPublic(WebhookDeliveryBase):
    id: uuid.UUID
    endpoint_id: uuid.UUID
    message_id: str = Field(description="The `webhook-id` header: the same on every attempt.")
    event_type: str


class WebhookDeliveryPage(SQLModel):
    items: list[WebhookDeliveryPublic]
    next_cursor: str | None = None


class WebhookDelivery(WebhookDeliveryBase, table=True):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "message_id", name="uq_webhook_deliveries_once"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    # A plain string column (as the emails' status): no database enum type to migrate.
    status: str = Field(default=DeliveryStatus.pending, max_length=16)  # type: ignore[assignment]
    endpoint_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False)
    )
    message_id: str = Field(
        sa_column=Column(ForeignKey("webhook_messages.id", ondelete="CASCADE"), nullable=False)
    )
    tenant_id: uuid.UUID
    event_type: str = Field(max_length=64)
    # Past this, a failing delivery is abandoned (`failed`); a manual redeliver opens a new
    # window.
    retry_until: datetime = Field(sa_type=UtcDateTime)


class WebhookAttemptBase(SQLModel):
    attempt: int = Field(description="1 for the first attempt of the delivery, then 2, ...")
    at: datetime = Field(sa_type=UtcDateTime)
    status_code: int | None = Field(default=None, description="The endpoint's answer.")
    error: str | None = Field(
        default=None, max_length=200, description="`timeout`, `connect_failed`, ... or null."
    )
    duration_seconds: float = Field(description="From the request sent to the answer read.")


class WebhookAttemptPublic(WebhookAttemptBase):
    id: uuid.UUID
    delivery_id: uuid.UUID


class WebhookAttemptPage(SQLModel):
    items: list[WebhookAttemptPublic]
    next_cursor: str | None = None


class WebhookAttempt(WebhookAttemptBase, table=True):
    """One HTTP attempt of a delivery: the delivery row keeps only the last one."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "id"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    delivery_id: uuid.UUID = Field(
        sa_column=Column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), nullable=False)
    )


class WebhooksTenant(TenantCopyRecord, table=True):
    """The webhooks service's copy of the registry's tenants: whose API key is whose."""

    __tablename__ = "webhooks_tenants"


class WebhooksCopyState(CopyStateRecord, table=True):
    """When the webhooks service's copy last held a whole snapshot of the registry."""

    __tablename__ = "webhooks_copy_state"
