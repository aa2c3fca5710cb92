"""oauth servers: how a server authenticates, its encrypted tokens, and started connections

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing servers are password servers: the server default fills the new column.
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("auth", sa.String(length=16), nullable=False, server_default="password")
        )
        batch_op.add_column(sa.Column("oauth_provider", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("refresh_token_ciphertext", sa.String(length=8192), nullable=True)
        )
        batch_op.add_column(
            sa.Column("access_token_ciphertext", sa.String(length=16384), nullable=True)
        )
        batch_op.add_column(
            sa.Column("access_token_expires_at", sa.DateTime(timezone=True), nullable=True)
        )

    op.create_table(
        "oauth_flows",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("verifier_ciphertext", sa.String(length=512), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=True),
        sa.Column("label", sa.String(length=100), nullable=False),
        sa.Column("from_name", sa.String(length=100), nullable=False),
        sa.Column("daily_cap", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result_server_id", sa.Uuid(), nullable=True),
        sa.Column("result_error", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("oauth_flows", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_oauth_flows_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_oauth_flows_expires_at"), ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("oauth_flows", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_oauth_flows_expires_at"))
        batch_op.drop_index(batch_op.f("ix_oauth_flows_tenant_id"))
    op.drop_table("oauth_flows")

    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.drop_column("access_token_expires_at")
        batch_op.drop_column("access_token_ciphertext")
        batch_op.drop_column("refresh_token_ciphertext")
        batch_op.drop_column("oauth_provider")
        batch_op.drop_column("auth")
