"""server reputation: the bounce and complaint rates the mailbox reader reports with a poll

Revision ID: registry_0004
Revises: registry_0003
Create Date: 2026-12-08 00:18:47
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "registry_0004"
down_revision: str | None = "registry_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable and not back-filled: a server shows `reputation: null` until the scheduler's
    # next poll report carries its rates.
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reputation_sample", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("reputation_bounce_rate", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("reputation_complaint_rate", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("reputation_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.drop_column("reputation_at")
        batch_op.drop_column("reputation_complaint_rate")
        batch_op.drop_column("reputation_bounce_rate")
        batch_op.drop_column("reputation_sample")
