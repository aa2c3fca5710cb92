"""The email as it goes on the wire: RFC 5322 headers, MIME body, SMTP dot-stuffing.

The bytes are written directly rather than through the standard library's header registry,
which cost 15-22 % of a sender's CPU: headers are folded at spaces to 78 characters, anything
that is not plain ASCII (or that would read as an encoded word) becomes RFC 2047 UTF-8 encoded
words, and bodies are 7bit when they can be and quoted-printable or base64 otherwise. Nothing
in them depends on the time of the attempt or on randomness: the Date is the email's own
(`EmailContent.date`), the MIME boundary is derived from the Message-ID, so every attempt of an
email sends the same bytes. Addresses with a non-ASCII local part, which need SMTPUTF8, are
left to the standard library as before.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr

from shared.messages import EmailContent

_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
# Characters that make a display name need quoting (RFC 5322 "specials", plus the quote and
# backslash that the quoting escapes).
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
# Not allowed in a 7bit body (RFC 2045 2.7); such a text goes quoted-printable.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
HEADER_WIDTH = 78  # RFC 5322 2.1.1: SHOULD
HEADER_LIMIT = 998  # RFC 5322 2.1.1: MUST
BODY_LINE_LIMIT = 998  # RFC 5321 4.5.3.1.6, without the CRLF
# An encoded word is at most 75 characters (RFC 2047 2): "=?utf-8?b?" + 60 base64 + "?=" is 72,
# and 60 base64 characters carry 45 bytes.
_WORD_BYTES = 45


def domain_of(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


def _encoded_words(value: str) -> list[str]:
    """`value` as UTF-8 base64 encoded words, each whole characters and at most 75 long."""
    words: list[str] = []
    chunk = bytearray()
    for char in value:
        raw = char.encode()
        if len(chunk) + len(raw) > _WORD_BYTES:
            words.append(_word(bytes(chunk)))
            chunk.clear()
        chunk += raw
    if chunk or not words:
        words.append(_word(bytes(chunk)))
    return words


def _word(raw: bytes) -> str:
    return "=?utf-8?b?" + binascii.b2a_base64(raw, newline=False).decode() + "?="


def _needs_encoding(value: str) -> bool:
    # "=?" would be decoded by a reader as the start of an encoded word.
    return not value.isascii() or "=?" in value


def _fold(name: str, value: str) -> str | None:
    """`Name: value` folded before spaces to 78 columns; None if a line would pass 998."""
    line = f"{name}: {value}"
    if len(line) <= HEADER_WIDTH:
        return line
    pieces = value.split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for index, piece in enumerate(pieces):
        # A fold goes before a space; never before an empty piece, so that no line is blank.
        if index and piece and len(current) + 1 + len(piece) > HEADER_WIDTH:
            lines.append(current)
            current = " " + piece
        else:
            current += " " + piece
    lines.append(current)
    if any(len(each) > HEADER_LIMIT for each in lines):
        return None
    return "\r\n".join(lines)


def _unstructured(name: str, value: str) -> str:
    """An unstructured field (Subject, a tenant's header) whose value reads back as `value`."""
    if not _needs_encoding(value):
        folded = _fold(name, value)
        if folded is not None:
            return folded
    # Space between adjacent encoded words is dropped by readers, so the value comes back whole.
    return f"{name}: " + "\r\n ".join(_encoded_words(value))


def _mailbox(name: str, address: str) -> str:
    """An address with an optional display name (RFC 5322 3.4)."""
    if not name.strip():
        return address
    if _needs_encoding(name):
        phrase = "\r\n ".join(_encoded_words(name))
    elif _SPECIALS.search(name) or "  " in name or name != name.strip():
        # Quoted, specials and spacing alike read back exactly.
        phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        phrase = name
    return f"{phrase} <{address}>"


def _ascii_address(address: str) -> str | None:
    """The address as it may be written in a 7-bit header: the domain in IDNA; None when the
    local part is not ASCII (that needs SMTPUTF8)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address if address.isascii() else None
    if not local.isascii():
        return None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return f"{local}@{domain}"


def _body_part(text: str, subtype: str) -> tuple[list[str], bytes]:
    """The Content-Type and Content-Transfer-Encoding fields of one text part, and its body."""
    lines = _LINE_BREAKS.split(text)
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()  # a final line break, not an empty last line; an empty text is one line
    headers = [f'Content-Type: text/{subtype}; charset="utf-8"']
    plain = text.isascii() and not _CONTROL.search(text)
    if plain and all(len(line) <= BODY_LINE_LIMIT for line in lines):
        body = "".join(line + "\r\n" for line in lines).encode("ascii")
        return [*headers, "Content-Transfer-Encoding: 7bit"], body
    joined = "".join(line + "\n" for line in lines)
    raw = joined.encode()
    non_ascii = len(raw) - len(joined.encode("ascii", "ignore"))
    if non_ascii * 3 > len(raw):
        # Mostly non-Latin text: base64 is the shorter of the two, in 76-character lines, of
        # the text in its canonical form (CRLF line breaks, RFC 2045 6.8).
        encoded = binascii.b2a_base64(raw.replace(b"\n", b"\r\n"), newline=False)
        body = b"".join(encoded[i : i + 76] + b"\r\n" for i in range(0, len(encoded), 76))
        return [*headers, "Content-Transfer-Encoding: base64"], body
    quoted = binascii.b2a_qp(raw, quotetabs=False, istext=True, header=False)
    body = quoted.replace(b"\n", b"\r\n")
    return [*headers, "Content-Transfer-Encoding: quoted-printable"], body


def _boundary(message_id: str, parts: list[bytes]) -> str:
    """A boundary from the Message-ID (the same on every attempt) that no part contains."""
    digest = hashlib.sha256(message_id.encode()).hexdigest()[:32]
    # "=_" cannot start a line of quoted-printable or base64; a 7bit part is checked.
    boundary = f"=_abl_{digest}"
    counter = 0
    while any(boundary.encode() in part for part in parts):
        counter += 1
        boundary = f"=_abl_{digest}_{counter}"
    return boundary


def unsubscribe_headers(content: EmailContent, from_email: str) -> list[tuple[str, str]]:
    """RFC 8058 one-click (the POST a mailbox provider makes), and RFC 2369's mailto: to the
    sending mailbox itself, where the mailbox reader recognises the token."""
    if not (content.unsubscribe_url and content.unsubscribe_token):
        return []
    mailto = f"mailto:{from_email}?subject=unsubscribe%20{content.unsubscribe_token}"
    return [
        ("List-Unsubscribe", f"<{content.unsubscribe_url}>, <{mailto}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]


def build_wire(content: EmailContent, *, from_email: str, from_name: str, now: datetime) -> bytes:
    """The DATA of the email: CRLF lines, leading dots doubled, ending with the final '.'.

    `now` is the Date only for a job that carries no `content.date` (jobs queued before the
    field existed).
    """
    sender = _ascii_address(from_email)
    recipient = _ascii_address(content.to)
    reply_to = _ascii_address(content.reply_to) if content.reply_to else None
    if sender is None or recipient is None or (content.reply_to and reply_to is None):
        return wire_bytes(
            build_message(content, from_email=from_email, from_name=from_name, now=now)
        )
    headers = [
        "From: " + _mailbox(from_name, sender),
        "To: " + recipient,
        _unstructured("Subject", content.subject),
        "Date: " + format_datetime(content.date or now),
        # The same on every retry, so a receiving server can recognise a repeat.
        f"Message-ID: <{content.message_id}@{domain_of(sender)}>",
    ]
    if reply_to:
        headers.append("Reply-To: " + reply_to)
    headers.extend(_unstructured(name, value) for name, value in content.headers.items())
    headers.extend(_unstructured(n, v) for n, v in unsubscribe_headers(content, sender))
    headers.append("MIME-Version: 1.0")
    if content.text is not None and content.html is not None:
        text_headers, text_body = _body_part(content.text, "plain")
        html_headers, html_body = _body_part(content.html, "html")
        boundary = _boundary(content.message_id, [text_body, html_body])
        headers.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        # Each delimiter's leading CRLF belongs to it (RFC 2046 5.1.1), not to the part before.
        body = b"".join(
            (
                f"--{boundary}\r\n".encode(),
                "\r\n".join(text_headers).encode(),
                b"\r\n\r\n",
                text_body,
                f"\r\n--{boundary}\r\n".encode(),
                "\r\n".join(html_headers).encode(),
                b"\r\n\r\n",
                html_body,
                f"\r\n--{boundary}--\r\n".encode(),
            )
        )
    else:
        part_headers, body = (
            _body_part(content.text, "plain")
            if content.text is not None
            else _body_part(content.html or "", "html")
        )
        headers.extend(part_headers)
    payload = "\r\n".join(headers).encode("ascii") + b"\r\n\r\n" + body
    return _LEADING_DOT.sub(b"..", payload) + b".\r\n"


def build_message(
    content: EmailContent, *, from_email: str, from_name: str, now: datetime
) -> EmailMessage:
    """The same email through the standard library, for addresses that need SMTPUTF8."""
    message = EmailMessage(policy=SMTP)
    message["From"] = formataddr((from_name, from_email)) if from_name else from_email
    message["To"] = content.to
    message["Subject"] = content.subject
    message["Date"] = format_datetime(content.date or now)
    message["Message-ID"] = f"<{content.message_id}@{domain_of(from_email)}>"
    if content.reply_to:
        message["Reply-To"] = content.reply_to
    for name, value in content.headers.items():
        message[name] = value
    for name, value in unsubscribe_headers(content, from_email):
        message[name] = value
    if content.text is not None:
        message.set_content(content.text)
        if content.html is not None:
            message.add_alternative(content.html, subtype="html")
    else:
        message.set_content(content.html or "", subtype="html")
    return message


def wire_bytes(message: EmailMessage) -> bytes:
    """CRLF lines with leading dots doubled, ending with the final '.' line (RFC 5321)."""
    payload = message.as_bytes(policy=SMTP)
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return _LEADING_DOT.sub(b"..", payload) + b".\r\n"
