"""copy state: when the scheduler's copy of the registry last held a whole snapshot (readiness)

Revision ID: scheduler_0005
Revises: scheduler_0004
Create Date: 2026-12-08 00:50:20.647492
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "scheduler_0005"
down_revision: str | None = "scheduler_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scheduler_copy_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("snapshot_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("scheduler_copy_state")
