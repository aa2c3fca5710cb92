"""What a message found in a sending mailbox means for our emails. Pure: bytes in, a verdict out.

- Bounces: flufl.bounce (GNU Mailman's detectors: RFC 3464 `multipart/report` DSNs and the
  common non-standard formats of Exim, Postfix, qmail, Microsoft, Yahoo, ...) says which
  recipients failed, temporarily or for good. A standard DSN's `message/delivery-status` part
  adds the status code and the diagnostic, read with the email package's parser.
- Complaints: an ARF report (`multipart/report; report-type=feedback-report`).
- Replies: `In-Reply-To` or `References` naming one of our Message-IDs; auto-replies
  (`Auto-Submitted` other than `no`, `X-Autoreply`, `X-Autorespond`, `Precedence:
  auto_reply`, RFC 3834) are told apart from people.
- Unsubscribes: the `mailto:` variant of List-Unsubscribe, whose subject carries the token.

Our emails are found by the Message-ID the product sets (`<abl.{email id hex}@{from domain}>`),
in the headers of the original message a DSN or report carries, or else by the failed
recipient.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
import uuid
from dataclasses import dataclass
from email.message import Message
from enum import StrEnum

from flufl.bounce import all_failures

from services.scheduler import unsubscribe

# Our own Message-ID, wherever it is quoted (a header, an attached original, a pasted one).
_OUR_ID = re.compile(rb"<abl\.([0-9a-f]{32})@[^>\s]+>")
# An RFC 3463 status code (class.subject.detail), wherever it sits in a DSN's Status field:
# servers write `5.1.1 (user unknown)` or `5.1.1 <addr>` there as well as the bare code.
_STATUS_CODE = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
# RFC 5321's longest path: the address columns hold no more, and nothing longer is an address.
MAX_ADDRESS = 320
_AUTO_SUBJECT = ("automatic reply", "auto:", "out of office", "autoreply", "abwesenheit")


class Kind(StrEnum):
    hard_bounce = "hard_bounce"
    soft_bounce = "soft_bounce"
    complaint = "complaint"
    reply = "reply"
    auto_reply = "auto_reply"
    unsubscribe = "unsubscribe"
    other = "other"


@dataclass(frozen=True)
class Feedback:
    kind: Kind
    key: str  # names the notification itself, so that reading it twice counts it once
    email_ids: tuple[uuid.UUID, ...] = ()
    recipients: tuple[str, ...] = ()
    status: str | None = None
    diagnostic: str | None = None
    token: str | None = None


def our_ids(data: bytes) -> tuple[uuid.UUID, ...]:
    return tuple(dict.fromkeys(uuid.UUID(hex=m.decode()) for m in _OUR_ID.findall(data)))


def _key(message: Message, raw: bytes) -> str:
    own = message.get("Message-ID")
    if own:
        return "id:" + str(own).strip()[:200]
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _attached_headers(message: Message) -> bytes:
    """The original message (or its headers) a DSN or an ARF report carries."""
    found = []
    for part in message.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, Message):
                found.append(inner.as_bytes())
        elif kind in ("text/rfc822-headers", "text/plain"):
            body = part.get_payload(decode=True)
            if isinstance(body, bytes):
                found.append(body)
    return b"\n".join(found)


def _delivery_status(message: Message) -> tuple[str | None, str | None]:
    """The first recipient's Status and Diagnostic-Code of a standard DSN."""
    for part in message.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            continue
        for block in blocks[1:]:  # the first block is per message, the others per recipient
            if not isinstance(block, Message):
                continue
            status = block.get("Status")
            diagnostic = block.get("Diagnostic-Code")
            if status:
                text = str(diagnostic).partition(";")[2].strip() if diagnostic else None
                return status_code(str(status)), (" ".join(text.split())[:1000] if text else None)
    return None, None


def status_code(field: str) -> str | None:
    """The `d.d.d` code of a DSN's Status field; None when it holds none."""
    found = _STATUS_CODE.search(field)
    return found.group(1) if found else None


def _auto_reply(message: Message) -> bool:
    submitted = str(message.get("Auto-Submitted", "no")).strip().lower()
    if submitted and submitted != "no":
        return True
    if message.get("X-Autoreply") or message.get("X-Autorespond"):
        return True
    if str(message.get("Precedence", "")).strip().lower() == "auto_reply":
        return True
    subject = str(message.get("Subject", "")).strip().lower()
    return subject.startswith(_AUTO_SUBJECT)


def _addresses(values: set[bytes] | set[str]) -> tuple[str, ...]:
    found = []
    for value in values:
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        found.append(text.strip().strip("<>").lower())
    return tuple(sorted(a for a in found if "@" in a and len(a) <= MAX_ADDRESS))


def classify(raw: bytes) -> Feedback:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    key = _key(message, raw)
    token = unsubscribe.token_in_subject(str(message.get("Subject", "")))
    if token is not None:
        return Feedback(Kind.unsubscribe, key, token=token)
    content_type = message.get_content_type()
    report_type = str(message.get_param("report-type", "") or "").lower()
    if content_type == "multipart/report" and report_type == "feedback-report":
        return Feedback(Kind.complaint, key, email_ids=our_ids(_attached_headers(message)))
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # a detector tripping on an odd message must not stop the mailbox
        temporary, permanent = frozenset(), frozenset()
    if temporary or permanent or content_type == "multipart/report":
        status, diagnostic = _delivery_status(message)
        hard = bool(permanent) or (status or "").startswith("5")
        if temporary or permanent or status:
            return Feedback(
                Kind.hard_bounce if hard else Kind.soft_bounce,
                key,
                email_ids=our_ids(_attached_headers(message)),
                recipients=_addresses(set(permanent) | set(temporary)),
                status=status,
                diagnostic=diagnostic,
            )
    threaded = " ".join(str(message.get(h, "")) for h in ("In-Reply-To", "References"))
    ids = our_ids(threaded.encode(errors="replace"))
    if ids:
        return Feedback(Kind.auto_reply if _auto_reply(message) else Kind.reply, key, ids)
    return Feedback(Kind.other, key)
