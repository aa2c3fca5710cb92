"""Input rules every service applies to text that may reach an SMTP conversation or a header."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def refuse_control_chars(value: str) -> str:
    """Refuse CR, LF and other control characters, which could inject SMTP commands or headers."""
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters such as CR or LF")
    return value
