"""pending bounce pause: a pause the bounce-rate guard decided, kept until the registry takes it

Revision ID: scheduler_0003
Revises: scheduler_0002
Create Date: 2026-12-08 00:18:50
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "scheduler_0003"
down_revision: str | None = "scheduler_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: no cursor has a pending pause before this revision (those were in memory).
    with op.batch_alter_table("mailbox_cursors", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pending_pause", sa.String(length=512), nullable=True))
        batch_op.add_column(
            sa.Column("pending_pause_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("mailbox_cursors", schema=None) as batch_op:
        batch_op.drop_column("pending_pause_at")
        batch_op.drop_column("pending_pause")
