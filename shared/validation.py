"""Input rules every service applies to text that may reach an SMTP conversation or a header.

What the sender cannot put on the wire must be refused at the API with a 422, never accepted
and then stuck inside: a line or paragraph separator in a header ends the header (or worse,
starts a new one), a lone surrogate cannot be encoded at all, and an address whose local part is
not ASCII needs SMTPUTF8, which the senders do not use. Error messages name the kind of
character, never the input itself: it may be a password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

import email_validator
from pydantic import AfterValidator, BeforeValidator, GetJsonSchemaHandler, WithJsonSchema
from pydantic.json_schema import JsonSchemaValue
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


# The same rules as JSON Schema patterns, so the spec says what the API accepts (a generated
# client or form can check before sending, and schemathesis holds the app to it). Lone
# surrogates are refused too, but no pattern can name them: JSON Schema engines differ on them.
ONE_LINE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
# A header value may hold a tab (folded headers use it), nothing else from the controls.
HEADER_VALUE_PATTERN = r"^[^\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]*$"
NO_NUL_PATTERN = r"^[^\x00]*$"


@dataclass(frozen=True)
class SchemaPattern:
    """Adds `pattern` to a string's JSON schema; the field's validator enforces the same rule
    (tests/test_schemathesis.py sends values on both sides of it)."""

    pattern: str

    def __get_pydantic_json_schema__(
        self, core_schema: Any, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema["pattern"] = self.pattern
        return schema


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
    """An address as JSON Schema's `email` format has it (RFC 5321: no display name, no quoted
    local part, no IP literal), special-use domains (`.test`, `.invalid`) included: they are
    addresses, only undeliverable. A pydantic error would name the offending characters; this
    one does not."""
    if not isinstance(value, str):
        return value
    refuse_control_chars(value)
    try:
        checked = email_validator.validate_email(
            value,
            check_deliverability=False,
            globally_deliverable=False,
            test_environment=True,
            allow_smtputf8=True,  # refused below by ascii_address, with its own message
        )
    except email_validator.EmailNotValidError as exc:
        raise PydanticCustomError(
            "value_error", "must be an email address such as name@example.com"
        ) from exc
    return checked.normalized


def json_integer(value: object) -> object:
    """A JSON integer (2 or 2.0, as JSON Schema's `integer` has it), never `true` or `"2"`,
    which pydantic's lax mode would take for 1 and 2."""
    if isinstance(value, bool | str | bytes):
        raise PydanticCustomError("int_type", "must be an integer")
    return value


# Put after `annotated_types.Interval` bounds in the type: `Annotated[int, Interval(ge=1,
# le=9), JSON_INTEGER]`. In that order the bounds stay JSON Schema bounds; in sqlmodel's Field,
# an optional field's bounds leave its schema (`"ge": 1` instead of `"minimum": 1`).
JSON_INTEGER = BeforeValidator(json_integer)
# An email address a sender can use without SMTPUTF8, documented as `format: email` and stored
# in ASCII form (IDNA domain).
Address = Annotated[
    str,
    BeforeValidator(_address),
    AfterValidator(ascii_address),
    WithJsonSchema({"type": "string", "format": "email", "maxLength": 254}),
]
OneLine = Annotated[str, BeforeValidator(_one_line), SchemaPattern(ONE_LINE_PATTERN)]
# A one-line string whose model validator refuses what the pattern refuses (and may trim it).
OneLineText = Annotated[str, SchemaPattern(ONE_LINE_PATTERN)]
