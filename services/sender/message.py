"""The email as it goes on the wire, built with the standard library's email package."""

from __future__ import annotations

import re
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr

from shared.messages import EmailContent

_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


def build_message(
    content: EmailContent, *, from_email: str, from_name: str, now: datetime
) -> EmailMessage:
    message = EmailMessage(policy=SMTP)
    message["From"] = formataddr((from_name, from_email)) if from_name else from_email
    message["To"] = content.to
    message["Subject"] = content.subject
    message["Date"] = format_datetime(now)
    # The same on every retry, so a receiving server can recognise a repeat.
    message["Message-ID"] = f"<{content.message_id}@{domain_of(from_email)}>"
    if content.reply_to:
        message["Reply-To"] = content.reply_to
    for name, value in content.headers.items():
        message[name] = value
    if content.unsubscribe_url and content.unsubscribe_token:
        # RFC 8058 one-click (the POST a mailbox provider makes), and RFC 2369's mailto: to
        # the sending mailbox itself, where the mailbox reader recognises the token.
        mailto = f"mailto:{from_email}?subject=unsubscribe%20{content.unsubscribe_token}"
        message["List-Unsubscribe"] = f"<{content.unsubscribe_url}>, <{mailto}>"
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
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
