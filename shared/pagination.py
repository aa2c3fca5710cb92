"""Opaque cursors for keyset pagination over time-ordered UUID primary keys."""

from __future__ import annotations

import base64
import binascii
import uuid

from shared.errors import Unprocessable

# What `encode_cursor` writes: 16 bytes in unpadded URL-safe base64. Declared in the spec, so a
# client (or a fuzzer) that follows the spec never sends a cursor the API refuses.
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{22}$"


def encode_cursor(last_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(last_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str) -> uuid.UUID:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return uuid.UUID(bytes=raw)
    except (binascii.Error, ValueError) as exc:
        raise Unprocessable(
            "The cursor is not one this API returned.",
            code="invalid_cursor",
            hint="Pass the `next_cursor` of the previous page unchanged, or omit it.",
        ) from exc
