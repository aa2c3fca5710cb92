"""Events one service tells the others about, as they cross the broker (the `events` queue).

The registry and the scheduler write them to their own outbox in the transaction that makes the
change; the webhooks service turns them into signed deliveries to the tenant's endpoints. The
body of an event is exactly the payload a tenant's endpoint receives (Standard Webhooks:
`type`, `timestamp`, `data`), plus the tenant it belongs to, which is not sent.

Nothing secret travels here: an event names servers and emails, never a credential.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, TypeAdapter

from shared.timeutil import new_id, utcnow


class EventType(StrEnum):
    email_sent = "email.sent"
    email_failed = "email.failed"
    email_unknown = "email.unknown"
    email_bounced = "email.bounced"
    email_replied = "email.replied"
    # A queued email stopped before it left: its recipient (or domain) was suppressed since.
    email_suppressed = "email.suppressed"
    server_status_changed = "server.status_changed"
    server_warmup_step = "server.warmup_step"
    # The webhooks service's own notice: an endpoint failing for days was switched off.
    webhook_endpoint_disabled = "webhook.endpoint_disabled"


# What a final email status is announced as; statuses absent here (queued, scheduled, ...) are
# not events. `bounced` and `replied` are the deliverability states.
EMAIL_EVENTS: dict[str, EventType] = {
    "sent": EventType.email_sent,
    "failed": EventType.email_failed,
    "unknown": EventType.email_unknown,
    "bounced": EventType.email_bounced,
    "replied": EventType.email_replied,
    "suppressed": EventType.email_suppressed,
}


def new_event_id() -> str:
    # Time-ordered, and the `webhook-id` every delivery of this event carries, on every retry.
    return f"evt_{new_id().hex}"


class Event(BaseModel):
    id: str = Field(default_factory=new_event_id, pattern=r"^evt_[0-9a-f]{32}$")
    type: EventType
    tenant_id: uuid.UUID
    timestamp: datetime = Field(default_factory=utcnow)
    data: dict[str, Any]

    def payload(self) -> bytes:
        """The body a tenant's endpoint receives: no tenant id (the endpoint knows whose it is)."""
        body = {"type": self.type.value, "timestamp": self.timestamp.isoformat(), "data": self.data}
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, body: bytes) -> Event:
        return cls.model_validate_json(body)


# Events per message on the events queue: one publish (and one delivery to the webhooks
# service) for many, while a message stays far below the broker's frame size.
EVENTS_PER_MESSAGE = 100


class EventBatch(BaseModel):
    """Several events in one message, as the outbox relays publish them (`per_message`)."""

    events: list[Event]


# An events message: a batch, or one bare event (what relays published before they batched).
_EVENTS_MESSAGE: TypeAdapter[EventBatch | Event] = TypeAdapter(EventBatch | Event)


def decode_events(body: bytes) -> list[Event]:
    """The events an events message holds; ValueError (pydantic's) when it holds none."""
    parsed = _EVENTS_MESSAGE.validate_json(body)
    return parsed.events if isinstance(parsed, EventBatch) else [parsed]


def email_event(
    status: str,
    *,
    tenant_id: uuid.UUID,
    email_id: uuid.UUID,
    server_id: uuid.UUID | None,
    campaign: str | None,
    attempts: int,
    smtp_code: int | None,
    smtp_reply: str | None,
    at: datetime,
) -> Event | None:
    """The event a final status announces, or None for a status that is not one."""
    kind = EMAIL_EVENTS.get(status)
    if kind is None:
        return None
    return Event(
        type=kind,
        tenant_id=tenant_id,
        timestamp=at,
        data={
            "email_id": str(email_id),
            "status": status,
            "server_id": None if server_id is None else str(server_id),
            "campaign": campaign,
            "attempts": attempts,
            "smtp_code": smtp_code,
            "smtp_reply": smtp_reply,
        },
    )


def server_status_event(
    *,
    tenant_id: uuid.UUID,
    server_id: uuid.UUID,
    status: str,
    previous: str | None,
    reason: str | None,
    at: datetime,
    until: datetime | None = None,
) -> Event:
    return Event(
        type=EventType.server_status_changed,
        tenant_id=tenant_id,
        timestamp=at,
        data={
            "server_id": str(server_id),
            "status": status,
            "previous_status": previous,
            "reason": reason,
            "until": None if until is None else until.isoformat(),
        },
    )
