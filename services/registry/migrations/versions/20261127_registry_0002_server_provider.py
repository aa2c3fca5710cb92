"""server provider: the mailbox provider detected at the check (host, CNAME chain or MX)

Revision ID: registry_0002
Revises: registry_0001
Create Date: 2026-11-27 16:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "registry_0002"
down_revision: str | None = "registry_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable and not back-filled: a row stored before this revision keeps being judged by its
    # host (`shared.providers.provider_of`) until its next check stores what DNS says.
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.drop_column("provider")
