"""Authenticated encryption of SMTP passwords at rest.

AES-256-GCM with associated data that names the tenant and the server, so a ciphertext copied
to another row (another tenant's, or another server's) fails to decrypt instead of leaking.
Several keys may be configured: the first encrypts, every one decrypts, which lets an operator
rotate keys without downtime and then re-encrypt every row under the new key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = "v1"
NONCE_BYTES = 12


class DecryptionError(Exception):
    """No configured key opens this ciphertext (wrong key, wrong row, or tampering)."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"abl-key-id:" + key).hexdigest()[:12]


def generate_key() -> str:
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode().rstrip("=")


def associated_data(
    tenant_id: uuid.UUID, server_id: uuid.UUID, purpose: str = "smtp-password"
) -> bytes:
    """Binds a ciphertext to its tenant, its server and what it is: an OAuth refresh token
    copied into the password column (or the reverse) fails to decrypt too."""
    return f"abl/{purpose}/{FORMAT_VERSION}/{tenant_id}/{server_id}".encode()


@dataclass(frozen=True)
class Keyring:
    keys: tuple[bytes, ...]

    @classmethod
    def from_keys(cls, keys: Sequence[bytes]) -> Keyring:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        return cls(tuple(keys))

    @property
    def primary_id(self) -> str:
        return key_id(self.keys[0])

    def encrypt(self, plaintext: str, aad: bytes) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.keys[0]).encrypt(nonce, plaintext.encode(), aad)
        blob = base64.urlsafe_b64encode(nonce + sealed).decode()
        return f"{FORMAT_VERSION}:{self.primary_id}:{blob}"

    def decrypt(self, token: str, aad: bytes) -> str:
        try:
            version, kid, blob = token.split(":", 2)
            raw = base64.urlsafe_b64decode(blob)
        except ValueError as exc:
            raise DecryptionError("malformed ciphertext") from exc
        if version != FORMAT_VERSION:
            raise DecryptionError(f"unknown ciphertext version {version!r}")
        nonce, sealed = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        # Try the key the token names first, then the others: a key id is a hint, not a trust.
        ordered = sorted(self.keys, key=lambda key: key_id(key) != kid)
        for key in ordered:
            try:
                return AESGCM(key).decrypt(nonce, sealed, aad).decode()
            except InvalidTag:
                continue
        raise DecryptionError("no configured key decrypts this value")

    def needs_rotation(self, token: str) -> bool:
        return not token.startswith(f"{FORMAT_VERSION}:{self.primary_id}:")
