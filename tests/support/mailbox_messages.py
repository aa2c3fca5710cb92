"""Messages as they arrive in a sending mailbox: DSNs, ARF reports, replies, auto-replies."""

from __future__ import annotations

import uuid


def our_message_id(email_id: str | uuid.UUID, domain: str = "example.com") -> str:
    return f"<abl.{uuid.UUID(str(email_id)).hex}@{domain}>"


def dsn(recipient: str, message_id: str, *, status: str = "5.1.1", action: str = "failed") -> bytes:
    """An RFC 3464 delivery status notification, as Postfix or Exchange send it."""
    diagnostic = (
        "smtp; 550 5.1.1 <{r}>: Recipient address rejected: User unknown"
        if status.startswith("5")
        else "smtp; 452 4.2.2 <{r}>: Mailbox full"
    ).format(r=recipient)
    return f"""From: MAILER-DAEMON@mx.example.org
To: sender@example.com
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn.{uuid.uuid4().hex}@mx.example.org>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822; {recipient}
Action: {action}
Status: {status}
Diagnostic-Code: {diagnostic}

--B
Content-Type: text/rfc822-headers

From: sender@example.com
To: {recipient}
Subject: Hello
Message-ID: {message_id}

--B--
""".replace("\n", "\r\n").encode()


def qmail_bounce(recipient: str) -> bytes:
    """A non-standard bounce (qmail's format): no multipart/report, no original headers."""
    return f"""From: MAILER-DAEMON@qmail.example.net
To: sender@example.com
Subject: failure notice
Message-ID: <qmail.{uuid.uuid4().hex}@qmail.example.net>

Hi. This is the qmail-send program at qmail.example.net.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<{recipient}>:
Sorry, no mailbox here by that name. (#5.1.1)

--- Below this line is a copy of the message.

Subject: Hello
""".replace("\n", "\r\n").encode()


def reply(sender: str, message_id: str, *, auto: bool = False) -> bytes:
    extra = "Auto-Submitted: auto-replied\r\n" if auto else ""
    subject = "Automatic reply: Hello" if auto else "Re: Hello"
    return (
        f"From: {sender}\r\nTo: sender@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <r.{uuid.uuid4().hex}@example.org>\r\n"
        f"In-Reply-To: {message_id}\r\nReferences: {message_id}\r\n{extra}\r\n"
        "Thanks, tell me more.\r\n"
    ).encode()


def arf(recipient: str, message_id: str) -> bytes:
    return f"""From: feedback@isp.example
To: sender@example.com
Subject: Abuse report
Message-ID: <arf.{uuid.uuid4().hex}@isp.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="A"

--A
Content-Type: text/plain

This is an email abuse report.

--A
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: isp-fbl/1.0
Version: 1

--A
Content-Type: text/rfc822-headers

From: sender@example.com
To: {recipient}
Message-ID: {message_id}

--A--
""".replace("\n", "\r\n").encode()


def mailto_unsubscribe(sender: str, token: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: sender@example.com\r\nSubject: unsubscribe {token}\r\n"
        f"Message-ID: <u.{uuid.uuid4().hex}@example.org>\r\n\r\n\r\n"
    ).encode()
