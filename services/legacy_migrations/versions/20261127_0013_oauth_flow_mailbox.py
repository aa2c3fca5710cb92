"""oauth flow mailbox: a connection may ask to read the mailbox with the same grant

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-27 14:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("oauth_flows", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("read_mailbox", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("imap_port", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("imap_security", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("oauth_flows", schema=None) as batch_op:
        batch_op.drop_column("imap_security")
        batch_op.drop_column("imap_port")
        batch_op.drop_column("read_mailbox")
