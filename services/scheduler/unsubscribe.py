"""One-click unsubscribe (RFC 8058): a link signed per recipient, and what using it does.

The token is the email's id and an HMAC-SHA256 over the email id, its tenant and its
recipient, so a token names one recipient of one email and cannot be forged or moved to
another address. A token works once: the email records when it was used, and a second use is
refused (a recipient who is already suppressed needs nothing more).

The key is its own secret, `ABL_UNSUBSCRIBE_KEY`, read by the scheduler only (it signs, the
public route and the mailbox reader verify). Old keys listed in `ABL_UNSUBSCRIBE_OLD_KEYS`
still verify, so a rotation does not break the links in emails already sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlmodel.ext.asyncio.session import AsyncSession

from services.scheduler import suppression
from services.scheduler.models import Email, SuppressionSource
from shared.errors import Conflict, NotFound

TOKEN_PATTERN = r"^[A-Za-z0-9_-]{43}$"  # noqa: S105 - a shape, not a secret
_MAC_BYTES = 16
# What a `mailto:` unsubscribe carries in its subject; the mailbox reader looks for it.
SUBJECT_PREFIX = "unsubscribe "
_SUBJECT_TOKEN = re.compile(r"\bunsubscribe ([A-Za-z0-9_-]{43})\b")


def derive_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"abl/unsubscribe/v1", hashlib.sha256).digest()


@dataclass(frozen=True)
class Keys:
    """The key that signs new links, and every key a link may have been signed with."""

    signing: bytes
    accepted: tuple[bytes, ...]


def keys_from(secrets: Sequence[str]) -> Keys:
    """From the configured secrets, the current one first (`unsubscribe_secrets`)."""
    derived = tuple(derive_key(secret) for secret in secrets)
    return Keys(signing=derived[0], accepted=derived)


def _mac(key: bytes, email_id: uuid.UUID, tenant_id: uuid.UUID, to: str) -> bytes:
    message = email_id.bytes + tenant_id.bytes + to.lower().encode()
    return hmac.new(key, message, hashlib.sha256).digest()[:_MAC_BYTES]


def sign(key: bytes, email_id: uuid.UUID, tenant_id: uuid.UUID, to: str) -> str:
    raw = email_id.bytes + _mac(key, email_id, tenant_id, to)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def email_of(token: str) -> uuid.UUID | None:
    """The email a token names, before its signature is checked; None if malformed."""
    if not re.match(TOKEN_PATTERN, token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=")
    except (binascii.Error, ValueError):
        return None
    return uuid.UUID(bytes=raw[:16]) if len(raw) == 16 + _MAC_BYTES else None


def verify(
    keys: Sequence[bytes], token: str, email_id: uuid.UUID, tenant_id: uuid.UUID, to: str
) -> bool:
    """Whether any of `keys` signed `token` for this recipient of this email."""
    found = False
    for key in keys:  # every key is tried, so the time taken does not say which one matched
        expected = sign(key, email_id, tenant_id, to)
        found |= hmac.compare_digest(expected.encode(), token.encode())
    return found


def url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/v1/unsubscribe/{token}"


def token_in_subject(subject: str) -> str | None:
    found = _SUBJECT_TOKEN.search(subject)
    return found.group(1) if found else None


class UnsubscribeInvalid(NotFound):
    """Not a valid unsubscribe link (malformed, unknown or tampered)."""

    code = "unsubscribe_invalid"
    default_detail = "This unsubscribe link is not valid."
    hint = "Use the link exactly as it appears in the email's List-Unsubscribe header."


class UnsubscribeUsed(Conflict):
    """The unsubscribe link was already used."""

    code = "unsubscribe_used"
    default_detail = "This unsubscribe link was already used."
    hint = "The address is on the sender's suppression list; nothing more is needed."


def invalid() -> NotFound:
    # The same answer for a malformed token, an unknown email and a bad signature.
    return UnsubscribeInvalid()


async def use(session: AsyncSession, keys: Keys, token: str, now: datetime, *, via: str) -> Email:
    """Suppress the recipient the token names; refuse a tampered or already used token."""
    email_id = email_of(token)
    email = await session.get(Email, email_id) if email_id else None
    if email is None or not verify(keys.accepted, token, email.id, email.tenant_id, email.to):
        raise invalid()
    if email.unsubscribed_at is not None:
        raise UnsubscribeUsed()
    email.unsubscribed_at = now
    session.add(email)
    await suppression.suppress_address(
        session,
        email.tenant_id,
        email.to,
        SuppressionSource.unsubscribe,
        f"{via} unsubscribe (email {email.id})",
        now,
    )
    return email
