"""server status reason: why the bounce-rate guard paused a server

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_reason", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.drop_column("status_reason")
