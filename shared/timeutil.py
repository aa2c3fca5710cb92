"""Time and id helpers shared by every table."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import uuid6
from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> uuid.UUID:
    # Time-ordered ids let cursor pagination order by the primary key alone.
    return uuid.UUID(bytes=uuid6.uuid7().bytes)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC, on SQLite (which keeps no zone) too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are refused: pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is UTC:
            return value  # asyncpg's timestamptz values are UTC already: read on every row
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
