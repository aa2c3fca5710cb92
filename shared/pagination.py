"""Opaque cursors for keyset pagination over time-ordered UUID primary keys."""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated

from fastapi import Query

from shared.errors import Unprocessable

# What `encode_cursor` writes: 16 bytes in unpadded URL-safe base64. Declared in the spec, so a
# client (or a fuzzer) that follows the spec never sends a cursor the API refuses.
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{22}$"


CursorQuery = Annotated[
    str | None,
    Query(
        pattern=CURSOR_PATTERN,
        description="Where the page starts: the `next_cursor` of the previous page, unchanged; "
        "omit it for the first page.",
    ),
]
LIMIT_DESCRIPTION = "How many items a page holds at most."
Limit200Query = Annotated[int, Query(ge=1, le=200, description=LIMIT_DESCRIPTION)]
Limit500Query = Annotated[int, Query(ge=1, le=500, description=LIMIT_DESCRIPTION)]
NEXT_CURSOR_DESCRIPTION = "Pass it as `cursor` for the next page; null on the last page."


class InvalidCursor(Unprocessable):
    """The cursor is not one this API returned."""

    code = "invalid_cursor"
    default_detail = "The cursor is not one this API returned."
    hint = "Pass the `next_cursor` of the previous page unchanged, or omit it."


def encode_cursor(last_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(last_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str) -> uuid.UUID:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return uuid.UUID(bytes=raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidCursor() from exc
