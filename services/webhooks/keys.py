"""Key rotation for the webhooks service: re-encrypt every endpoint's signing secret (and the
previous one of a rotation still in its overlap) under the first key of ABL_ENCRYPTION_KEYS,
so that an old key can be removed without silencing an endpoint."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.webhooks.delivery import secret_aad
from services.webhooks.models import WebhookEndpoint
from shared.crypto import Keyring
from shared.timeutil import utcnow


async def reencrypt_secrets(
    sessions: async_sessionmaker[AsyncSession], keyring: Keyring
) -> tuple[int, int]:
    """(endpoints examined, endpoints re-encrypted)."""
    examined = reencrypted = 0
    async with sessions() as session, session.begin():
        for endpoint in (await session.exec(select(WebhookEndpoint))).all():
            examined += 1
            aad = secret_aad(endpoint.tenant_id, endpoint.id)
            changed = False
            for column in ("secret_ciphertext", "previous_secret_ciphertext"):
                sealed: str | None = getattr(endpoint, column)
                if sealed and keyring.needs_rotation(sealed):
                    # Opened with the old key first: a damaged row fails here, not at delivery.
                    setattr(endpoint, column, keyring.encrypt(keyring.decrypt(sealed, aad), aad))
                    changed = True
            if changed:
                endpoint.updated_at = utcnow()
                session.add(endpoint)
                reencrypted += 1
    return examined, reencrypted
