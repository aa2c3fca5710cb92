"""registry copies: tenants and servers get a version, raised by every change the other
services copy, and the outbox of those changes

Revision ID: registry_0003
Revises: registry_0002
Create Date: 2026-12-07 23:30:23.001693
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "registry_0003"
down_revision: str | None = "registry_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registry_changes_outbox",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("registry_changes_outbox", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_registry_changes_outbox_published_at"), ["published_at"], unique=False
        )

    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), server_default="0", nullable=False))

    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("version")

    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.drop_column("version")

    with op.batch_alter_table("registry_changes_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_registry_changes_outbox_published_at"))

    op.drop_table("registry_changes_outbox")
