"""copy state: when the webhooks copy of the registry last held a whole snapshot (readiness)

Revision ID: webhooks_0003
Revises: webhooks_0002
Create Date: 2026-12-08 00:50:24.286769
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "webhooks_0003"
down_revision: str | None = "webhooks_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhooks_copy_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("snapshot_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("webhooks_copy_state")
