"""email unsubscribe: the one-click flag and when its link was used

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 11:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("emails", schema=None) as batch_op:
        # server_default fills existing rows; the model sets the value on every insert.
        batch_op.add_column(
            sa.Column("unsubscribe", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("unsubscribed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("emails", schema=None) as batch_op:
        batch_op.drop_column("unsubscribed_at")
        batch_op.drop_column("unsubscribe")
