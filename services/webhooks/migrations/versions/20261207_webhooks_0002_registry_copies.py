"""registry copies: the webhooks service's own copy of the registry's tenants

Revision ID: webhooks_0002
Revises: webhooks_0001
Create Date: 2026-12-07 23:30:30.878775
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "webhooks_0002"
down_revision: str | None = "webhooks_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhooks_tenants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("copied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("api_key_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhooks_tenants", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_webhooks_tenants_api_key_hash"), ["api_key_hash"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("webhooks_tenants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhooks_tenants_api_key_hash"))

    op.drop_table("webhooks_tenants")
