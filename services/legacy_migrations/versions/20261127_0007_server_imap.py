"""server imap: mailbox access per server, and the mailbox reader's last poll

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 11:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("imap_host", sa.String(length=253), nullable=True))
        batch_op.add_column(sa.Column("imap_port", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("imap_security", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("imap_username", sa.String(length=320), nullable=True))
        batch_op.add_column(
            sa.Column("imap_password_ciphertext", sa.String(length=4096), nullable=True)
        )
        batch_op.add_column(
            sa.Column("imap_last_poll_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("imap_last_poll_error", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        for name in (
            "imap_last_poll_error",
            "imap_last_poll_at",
            "imap_password_ciphertext",
            "imap_username",
            "imap_security",
            "imap_port",
            "imap_host",
        ):
            batch_op.drop_column(name)
