"""Input rules every service applies to text that may reach an SMTP conversation or a header.

What the sender cannot put on the wire must be refused at the API with a 422, never accepted
and then stuck inside: a line or paragraph separator in a header ends the header (or worse,
starts a new one), a lone surrogate cannot be encoded at all, and an address whose local part is
not ASCII needs SMTPUTF8, which the senders do not use. Error messages name the kind of
character, never the input itself: it may be a password.
"""

from __future__ import annotations

import re
from typing import Annotated

import email_validator
from pydantic import AfterValidator, BeforeValidator, EmailStr
from pydantic.networks import validate_email
from pydantic_core import PydanticCustomError

# Every character after which some reader starts a new line: `str.splitlines()` breaks on each
# (LF, VT, FF, CR, the file/group/record separators, NEL, U+2028 LINE SEPARATOR and U+2029
# PARAGRAPH SEPARATOR), and the email package folds and splits headers with the same idea.
LINE_BREAKS = "\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAK = re.compile(f"[{re.escape(LINE_BREAKS)}]")
# C0 controls, DEL and the C1 controls (U+0080 to U+009F, NEL among them).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Half of a UTF-16 pair on its own: JSON can spell one (`"\ud800"`), UTF-8 cannot encode it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def refuse_control_chars(value: str, *, allow_tab: bool = False) -> str:
    """Refuse what must never be in a one-line value: line and paragraph separators (CR, LF,
    NEL, U+2028, U+2029, ...), other control characters and lone surrogates."""
    if _SURROGATE.search(value):
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)")
    if _LINE_BREAK.search(value):
        raise ValueError(
            "must be one line: no CR, LF, NEL (U+0085), U+2028, U+2029 or other line or "
            "paragraph separator"
        )
    checked = value.replace("\t", " ") if allow_tab else value
    if _CONTROL.search(checked):
        raise ValueError("must not contain control characters")
    return value


def refuse_unencodable(value: str) -> str:
    """Refuse what no body can carry: lone surrogates and NUL (RFC 5322 forbids it)."""
    if _SURROGATE.search(value):
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _one_line(value: object) -> object:
    return refuse_control_chars(value) if isinstance(value, str) else value


def ascii_address(value: str) -> str:
    """The address as it goes into MAIL FROM, RCPT TO and the headers: an ASCII local part, and
    an internationalised domain in its IDNA (`xn--`) form."""
    local, _, domain = value.rpartition("@")
    if not local.isascii():
        raise PydanticCustomError(
            "address_not_ascii",
            "the part before the @ must be ASCII: internationalised local parts need SMTPUTF8, "
            "which is not supported",
        )
    if domain.isascii():
        return value
    try:
        checked = email_validator.validate_email(
            value, check_deliverability=False, allow_smtputf8=False
        )
    except email_validator.EmailNotValidError as exc:
        raise PydanticCustomError(
            "domain_not_idna", "the domain has no valid IDNA (xn--) form"
        ) from exc
    return str(checked.ascii_email)


def _address(value: object) -> object:
    """A pydantic error for a bad address names the offending characters; this one does not."""
    if not isinstance(value, str):
        return value
    refuse_control_chars(value)
    try:
        validate_email(value)
    except PydanticCustomError as exc:
        raise PydanticCustomError(
            "value_error", "must be an email address such as name@example.com"
        ) from exc
    return value


# An email address a sender can use without SMTPUTF8. Validated like pydantic's EmailStr (and
# documented as `format: email`), then stored in ASCII form.
Address = Annotated[EmailStr, BeforeValidator(_address), AfterValidator(ascii_address)]
OneLine = Annotated[str, BeforeValidator(_one_line)]
