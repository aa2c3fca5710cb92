"""The bytes a sender puts on the wire read back, through the standard library's parser, as the
email the tenant asked for, and are the same on every attempt."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sender.message import build_message, build_wire, wire_bytes
from shared.messages import EmailContent

CREATED = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
LATER = CREATED + timedelta(hours=5)


def content(**changes: Any) -> EmailContent:
    values: dict[str, Any] = {
        "to": "lead@example.org",
        "subject": "Hello",
        "text": "Hi!",
        "message_id": "abl.0190-email",
        "date": CREATED,
    }
    values.update(changes)
    return EmailContent(**values)


def unstuffed(wire: bytes) -> bytes:
    """What the receiving server stores: the final '.' line removed, doubled dots undone."""
    assert wire.endswith(b"\r\n.\r\n")
    return re.sub(rb"(?m)^\.\.", b".", wire[: -len(b".\r\n")])


def parsed(wire: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(unstuffed(wire))
    assert isinstance(message, EmailMessage)
    return message


def build(item: EmailContent, name: str = "Acme Sales", now: datetime = LATER) -> bytes:
    return build_wire(item, from_email="sales@acme.com", from_name=name, now=now)


def body_text(message: EmailMessage, kind: str) -> str:
    part = message.get_body(preferencelist=(kind,))
    assert part is not None, f"no text/{kind} part"
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")  # the parser keeps the wire's CRLF line breaks


def canonical(text: str) -> str:
    """A text as the reader gets it back: LF line breaks, ending with one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def assert_well_formed(wire: bytes) -> None:
    assert wire.isascii(), "8-bit data needs 8BITMIME, which is not asked for"
    lines = wire.split(b"\r\n")
    assert all(len(line) <= 998 for line in lines), "RFC 5322 2.1.1: at most 998 characters"
    assert b"\n" not in wire.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in wire.replace(b"\r\n", b""), "bare CR"
    header = unstuffed(wire).split(b"\r\n\r\n", 1)[0]
    for line in header.split(b"\r\n"):
        assert line.strip(), "a header line made only of white space"


def test_the_headers_read_back() -> None:
    wire = build(content(reply_to="replies@acme.com", headers={"X-Campaign": "november"}))
    message = parsed(wire)
    assert message["From"].addresses[0].display_name == "Acme Sales"
    assert message["From"].addresses[0].addr_spec == "sales@acme.com"
    assert message["To"] == "lead@example.org"
    assert message["Reply-To"] == "replies@acme.com"
    assert message["Subject"] == "Hello"
    assert message["Message-ID"] == "<abl.0190-email@acme.com>"
    assert message["X-Campaign"] == "november"
    assert message["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(message["Date"]) == CREATED
    assert body_text(message, "plain") == "Hi!\n"
    assert_well_formed(wire)


def test_every_attempt_sends_the_same_bytes() -> None:
    item = content(subject="Café ☕ " * 20, html="<p>Hi é</p>", headers={"X-Tag": "ü" * 300})
    first = build(item, now=LATER)
    again = build(
        EmailContent.model_validate_json(item.model_dump_json()), now=LATER + timedelta(1)
    )
    assert first == again
    assert parsedate_to_datetime(parsed(first)["Date"]) == CREATED  # the email's, not the attempt's


def test_a_job_without_a_date_is_dated_by_its_attempt() -> None:
    message = parsed(build(content(date=None), now=LATER))
    assert parsedate_to_datetime(message["Date"]) == LATER


@pytest.mark.parametrize(
    "subject",
    [
        "Grüße aus Köln",
        "Привет, как дела? " * 8,
        "日本語の件名です" * 12,
        "emoji 🎉🚀 in the subject",
        "A long plain subject " * 20,
        "x" * 990,  # no space to fold at: encoded words keep every line under 998
        "looks like =?utf-8?q?an_encoded_word?= but is not",
        "  leading spaces and  double  spaces inside é",
    ],
)
def test_subjects_read_back(subject: str) -> None:
    wire = build(content(subject=subject))
    # The parser drops the white space after "Subject:"; encoded words keep it.
    assert parsed(wire)["Subject"] == (subject.lstrip() if subject.isascii() else subject)
    assert_well_formed(wire)


@pytest.mark.parametrize(
    "name",
    [
        "Acme",
        "Acme, Inc.",
        'The "Best" Team',
        "Jürgen Müller",
        "Отдел продаж",
        "a" * 100,
        "é" * 100,
    ],
)
def test_display_names_read_back(name: str) -> None:
    wire = build(content(), name=name)
    address = parsed(wire)["From"].addresses[0]
    display = address.display_name
    if len(name.encode()) > 45:
        # More than one encoded word: RFC 2047 6.2 says the white space between them is not
        # part of the name, but the standard library's address parser keeps a space there (it
        # does the same with its own builder's output); mail readers join them.
        display = display.replace(" ", "")
    assert (display, address.addr_spec) == (name, "sales@acme.com")
    assert_well_formed(wire)


def test_html_and_text_are_alternatives() -> None:
    wire = build(content(text="Hi Jürgen,\n.dot line\n", html="<p>Hi Jürgen,</p>\n<p>.</p>"))
    message = parsed(wire)
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert body_text(message, "plain") == "Hi Jürgen,\n.dot line\n"
    assert body_text(message, "html") == "<p>Hi Jürgen,</p>\n<p>.</p>\n"
    assert_well_formed(wire)


def test_html_alone() -> None:
    message = parsed(build(content(text=None, html="<b>Hi</b>")))
    assert message.get_content_type() == "text/html"
    assert body_text(message, "html") == "<b>Hi</b>\n"


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii\r\nwith CRLF\rand CR\n",
        "a line far longer than SMTP allows " * 60,
        "Съешь же ещё этих мягких французских булок " * 40,
        "trailing space \nand tab\t\n=equals= and \x00 a NUL",
        "..starts with dots\n.\n",
    ],
)
def test_bodies_read_back(text: str) -> None:
    wire = build(content(text=text))
    assert body_text(parsed(wire), "plain") == canonical(text)
    assert_well_formed(wire)


def test_a_body_that_holds_the_boundary_gets_another() -> None:
    first = build(content(text="a", html="<p>b</p>"))
    boundary = parsed(first).get_boundary()
    assert boundary is not None
    wire = build(content(text=f"--{boundary}\nfake part", html="<p>b</p>"))
    message = parsed(wire)
    assert message.get_boundary() != boundary
    assert body_text(message, "plain") == f"--{boundary}\nfake part\n"


def test_long_and_non_ascii_tenant_headers_read_back() -> None:
    headers = {
        "X-Long": " ".join(f"word{i}" for i in range(150)),
        "X-Unbroken": "y" * 990,
        "X-Accented": "Crème brûlée, s'il vous plaît",
        "List-Unsubscribe": "<mailto:unsub@acme.com?subject=stop>, <https://acme.com/u/1>",
    }
    wire = build(content(headers=headers))
    message = parsed(wire)
    for name, value in headers.items():
        assert message[name] == value
    assert_well_formed(wire)


def test_an_international_domain_is_written_in_idna() -> None:
    message = parsed(build(content(to="lead@bücher.example")))
    assert message["To"] == "lead@xn--bcher-kva.example"


def test_a_non_ascii_local_part_is_left_to_the_standard_library() -> None:
    item = content(to="jürgen@example.org")
    stdlib = wire_bytes(
        build_message(item, from_email="sales@acme.com", from_name="Acme Sales", now=LATER)
    )
    assert build(item) == stdlib


header_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\u2028\u2029"),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(
    subject=header_text,
    name=header_text.filter(lambda n: len(n) <= 100),
    text=st.text(max_size=2000),
    html=st.none() | st.text(max_size=500),
    header=header_text.filter(lambda value: len(value) <= 998),
)
def test_any_email_reads_back_like_the_standard_library_builds_it(
    subject: str, name: str, text: str, html: str | None, header: str
) -> None:
    item = content(subject=subject, text=text or "x", html=html, headers={"X-Any": header})
    wire = build(item, name=name)
    assert_well_formed(wire)
    ours = parsed(wire)
    theirs = parsed(
        wire_bytes(build_message(item, from_email="sales@acme.com", from_name=name, now=LATER))
    )
    for field in ("Subject", "X-Any", "To", "Message-ID", "Date"):
        assert str(ours[field]).strip() == str(theirs[field]).strip(), field
    address = ours["From"].addresses[0]
    assert address.addr_spec == "sales@acme.com"
    if name.isascii() and "=?" not in name:
        assert address.display_name == name.strip() or address.display_name == name
    else:  # see test_display_names_read_back for the space between encoded words
        assert address.display_name.replace(" ", "") == name.replace(" ", "")
    for kind in ("plain", "html"):
        if ours.get_body(preferencelist=(kind,)) is not None:
            assert body_text(ours, kind) == body_text(theirs, kind)
    assert ours.get_content_type() == theirs.get_content_type()
