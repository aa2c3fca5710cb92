"""Key rotation: re-encrypt every stored password and OAuth token under the first key of
ABL_ENCRYPTION_KEYS."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.registry import mailbox, repository
from shared.crypto import Keyring
from shared.timeutil import utcnow


@dataclass(frozen=True)
class RotationReport:
    examined: int
    reencrypted: int


async def rotate_keys(
    sessions: async_sessionmaker[AsyncSession], keyring: Keyring
) -> RotationReport:
    examined = reencrypted = 0
    async with sessions() as session, session.begin():
        async for server in repository.iter_all_servers(session):
            examined += 1
            changed = False
            # An OAuth server has no password (an empty column).
            if server.password_ciphertext and keyring.needs_rotation(server.password_ciphertext):
                # Decrypting with the old key proves the row is intact before it is rewritten.
                repository.seal_password(keyring, server, repository.open_password(keyring, server))
                changed = True
            for purpose, column in (
                (repository.REFRESH_TOKEN, "refresh_token_ciphertext"),
                (repository.ACCESS_TOKEN, "access_token_ciphertext"),
            ):
                sealed: str | None = getattr(server, column)
                if sealed and keyring.needs_rotation(sealed):
                    plain = repository.open_token(keyring, server, purpose, sealed)
                    setattr(server, column, repository.seal_token(keyring, server, purpose, plain))
                    changed = True
            # A mailbox read with the OAuth grant has no IMAP password (a null column): sealing
            # an empty one would turn its reads into a LOGIN with an empty password.
            if server.imap_password_ciphertext and keyring.needs_rotation(
                server.imap_password_ciphertext
            ):
                mailbox.store_password(keyring, server, mailbox.open_password(keyring, server))
                changed = True
            if not changed:
                continue
            server.updated_at = utcnow()
            session.add(server)
            reencrypted += 1
    return RotationReport(examined=examined, reencrypted=reencrypted)
