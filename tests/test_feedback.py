"""What a message in a sending mailbox means: bounces (standard and not), complaints, replies,
auto-replies, mailto unsubscribes, and messages that mean nothing."""

from __future__ import annotations

import uuid

import pytest

from services.scheduler.feedback import Kind, classify
from tests.support import mailbox_messages as m

EMAIL = uuid.UUID("6a849a1c-62a4-4c61-ac59-7ca6b498d783")
OURS = m.our_message_id(EMAIL, "acme.com")
TOKEN = "A" * 43


@pytest.mark.parametrize(
    ("raw", "kind", "email_ids", "recipients", "status"),
    [
        (m.dsn("Lead@x.org", OURS), Kind.hard_bounce, (EMAIL,), ("lead@x.org",), "5.1.1"),
        (
            m.dsn("lead@x.org", OURS, status="4.2.2", action="delayed"),
            Kind.soft_bounce,
            (EMAIL,),
            ("lead@x.org",),
            "4.2.2",
        ),
        (m.qmail_bounce("lead@x.org"), Kind.hard_bounce, (), ("lead@x.org",), None),
        (m.arf("lead@x.org", OURS), Kind.complaint, (EMAIL,), (), None),
        (m.reply("lead@x.org", OURS), Kind.reply, (EMAIL,), (), None),
        (m.reply("lead@x.org", OURS, auto=True), Kind.auto_reply, (EMAIL,), (), None),
        (m.mailto_unsubscribe("lead@x.org", TOKEN), Kind.unsubscribe, (), (), None),
        # A reply to someone else's email, and a newsletter, mean nothing here.
        (m.reply("lead@x.org", "<other@elsewhere.example>"), Kind.other, (), (), None),
        (b"From: news@x.org\r\nSubject: Weekly\r\n\r\nHello\r\n", Kind.other, (), (), None),
        # No From at all: one of flufl.bounce's detectors raises on it; still just "other".
        (b"Subject: untouched\r\n\r\nbody\r\n", Kind.other, (), (), None),
    ],
)
def test_messages_are_classified(
    raw: bytes,
    kind: Kind,
    email_ids: tuple[uuid.UUID, ...],
    recipients: tuple[str, ...],
    status: str | None,
) -> None:
    verdict = classify(raw)
    assert verdict.kind is kind
    assert verdict.email_ids == email_ids
    assert verdict.recipients == recipients
    assert verdict.status == status


def test_a_dsn_keeps_its_diagnostic_and_the_same_message_the_same_key() -> None:
    raw = m.dsn("lead@x.org", OURS)
    verdict = classify(raw)
    assert verdict.diagnostic is not None
    assert "User unknown" in verdict.diagnostic
    assert classify(raw).key == verdict.key
    assert classify(m.dsn("lead@x.org", OURS)).key != verdict.key
    assert classify(m.mailto_unsubscribe("lead@x.org", TOKEN)).token == TOKEN
