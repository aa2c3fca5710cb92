"""registry copies: the scheduler's own copy of the registry's tenants and servers

Revision ID: scheduler_0002
Revises: scheduler_0001
Create Date: 2026-12-07 23:30:26.914736
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "scheduler_0002"
down_revision: str | None = "scheduler_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scheduler_servers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("copied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("daily_cap", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=100), nullable=False),
        sa.Column("host", sa.String(length=253), nullable=False),
        sa.Column("username", sa.String(length=320), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=True),
        sa.Column("reads_mailbox", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("scheduler_servers", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_scheduler_servers_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "scheduler_tenants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("copied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("api_key_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("scheduler_tenants", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_scheduler_tenants_api_key_hash"), ["api_key_hash"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("scheduler_tenants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_scheduler_tenants_api_key_hash"))

    op.drop_table("scheduler_tenants")
    with op.batch_alter_table("scheduler_servers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_scheduler_servers_tenant_id"))

    op.drop_table("scheduler_servers")
