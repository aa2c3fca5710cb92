"""What the registry tells the services that keep a copy of its tenants and servers.

The registry owns tenants and servers. The scheduler (which servers may send, their caps and
providers, which have a mailbox) and the webhooks service (whose API key is whose) keep their own
copies in their own tables, fed two ways:
- a `RegistryChange` on the broker for every change, written to the registry's outbox in the
  transaction that makes it (`services/registry/changes.py`), one queue per consuming service;
- the snapshot routes `GET /internal/v1/copies/{tenants,servers}` (pages of the same records),
  read when a copy is empty, to heal it now and then, and for a record a request needs before
  its change has arrived.

Each record carries the row's `version`, raised by the registry in the statement that changes
it: a copy takes a record only when it is newer than what it holds, so a replay, a duplicate or
two changes arriving out of order leave it as the newest one said. A deleted row is sent once
more as a tombstone (`deleted`), kept by the copies so a late older record cannot revive it.

Nothing secret travels: a tenant's `api_key_hash` is the SHA-256 of a random 256-bit key (what
every service needs to tell which tenant a key belongs to, and useless for making one); no
password, token or ciphertext is in a record.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal, Protocol, Self

from pydantic import BaseModel, Field, model_validator

from shared.events import new_event_id
from shared.pagination import NEXT_CURSOR_DESCRIPTION
from shared.timeutil import utcnow

Change = Literal["created", "updated", "deleted"]
# A page of the snapshot routes at the most.
COPY_PAGE_MAX = 1000


class TenantCopy(BaseModel):
    id: uuid.UUID
    name: str
    api_key_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    version: int = Field(ge=0)
    deleted: bool = False


class ServerCopy(BaseModel):
    id: uuid.UUID
    tenant_id: uuid.UUID
    status: str
    daily_cap: int
    label: str
    host: str
    username: str
    provider: str | None
    reads_mailbox: bool
    version: int = Field(ge=0)
    deleted: bool = False


class RegistryChange(BaseModel):
    """One changed row, as the broker carries it: `tenant.changed` with `tenant`, or
    `server.changed` with `server` (created, updated in any copied column — verified, paused,
    resumed, auth_failed, its cap or provider —, or deleted)."""

    id: str = Field(default_factory=new_event_id)
    type: Literal["tenant.changed", "server.changed"]
    change: Literal["created", "updated", "deleted"]
    at: datetime = Field(default_factory=utcnow)
    tenant: TenantCopy | None = None
    server: ServerCopy | None = None

    @model_validator(mode="after")
    def _one_record(self) -> Self:
        record = self.tenant if self.type == "tenant.changed" else self.server
        other = self.server if self.type == "tenant.changed" else self.tenant
        if record is None or other is not None:
            raise ValueError(f"a {self.type} carries its own record and no other")
        return self

    @classmethod
    def of_server(cls, server: ServerCopy, change: Change) -> RegistryChange:
        return cls(type="server.changed", change=change, server=server)

    @classmethod
    def of_tenant(cls, tenant: TenantCopy, change: Change) -> RegistryChange:
        return cls(type="tenant.changed", change=change, tenant=tenant)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, body: bytes) -> RegistryChange:
        return cls.model_validate_json(body)


class TenantCopyPage(BaseModel):
    items: list[TenantCopy]
    next_cursor: str | None = Field(default=None, description=NEXT_CURSOR_DESCRIPTION)


class ServerCopyPage(BaseModel):
    items: list[ServerCopy]
    next_cursor: str | None = Field(default=None, description=NEXT_CURSOR_DESCRIPTION)


class CopyUnavailable(RuntimeError):
    """The registry could not be asked now (unreachable, or an answer that does not validate)."""


class RegistrySource(Protocol):
    """Where a copy reads the registry's records: its snapshot routes over HTTP in the stack,
    the registry's repository as function calls in one process. Pages in id order."""

    async def tenants(
        self, *, cursor: str | None, limit: int, key_digest: str | None = None
    ) -> TenantCopyPage: ...

    async def servers(
        self, *, cursor: str | None, limit: int, tenant_id: uuid.UUID | None = None
    ) -> ServerCopyPage: ...
