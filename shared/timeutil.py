"""Time and id helpers shared by every table."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import uuid6


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> uuid.UUID:
    # Time-ordered ids let cursor pagination order by the primary key alone.
    return uuid.UUID(bytes=uuid6.uuid7().bytes)
