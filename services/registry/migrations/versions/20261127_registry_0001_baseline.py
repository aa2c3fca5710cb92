"""registry tables as the shared history left them at 0013

Revision ID: registry_0001
Revises:
Create Date: 2026-11-27 16:22:21.018578
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "registry_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registry_outbox",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("registry_outbox", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_registry_outbox_published_at"), ["published_at"], unique=False
        )

    op.create_table(
        "tenants",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("api_key_hash", sa.String(length=64), nullable=False),
        sa.Column("api_key_prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tenants_api_key_hash"), ["api_key_hash"], unique=True)

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
        sa.Column("read_mailbox", sa.Boolean(), nullable=False),
        sa.Column("imap_port", sa.Integer(), nullable=True),
        sa.Column("imap_security", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result_server_id", sa.Uuid(), nullable=True),
        sa.Column("result_error", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("oauth_flows", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_oauth_flows_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_oauth_flows_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "smtp_servers",
        sa.Column("label", sa.String(length=100), nullable=False),
        sa.Column("from_name", sa.String(length=100), nullable=False),
        sa.Column("daily_cap", sa.Integer(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("host", sa.String(length=253), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("security", sa.String(length=16), nullable=False),
        sa.Column("username", sa.String(length=320), nullable=False),
        sa.Column("from_email", sa.String(length=320), nullable=False),
        sa.Column("password_ciphertext", sa.String(length=4096), nullable=False),
        sa.Column("auth", sa.String(length=16), server_default="password", nullable=False),
        sa.Column("oauth_provider", sa.String(length=32), nullable=True),
        sa.Column("refresh_token_ciphertext", sa.String(length=8192), nullable=True),
        sa.Column("access_token_ciphertext", sa.String(length=16384), nullable=True),
        sa.Column("access_token_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("last_check_code", sa.String(length=32), nullable=True),
        sa.Column("last_check_reply", sa.String(length=512), nullable=True),
        sa.Column("last_checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status_reason", sa.String(length=512), nullable=True),
        sa.Column("imap_host", sa.String(length=253), nullable=True),
        sa.Column("imap_port", sa.Integer(), nullable=True),
        sa.Column("imap_security", sa.String(length=16), nullable=True),
        sa.Column("imap_username", sa.String(length=320), nullable=True),
        sa.Column("imap_password_ciphertext", sa.String(length=4096), nullable=True),
        sa.Column("imap_last_poll_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("imap_last_poll_error", sa.String(length=512), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "host", "username", name="uq_smtp_servers_tenant_login"),
    )
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_smtp_servers_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_smtp_servers_tenant_id"), ["tenant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("smtp_servers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_smtp_servers_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_smtp_servers_status"))

    op.drop_table("smtp_servers")
    with op.batch_alter_table("oauth_flows", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_oauth_flows_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_oauth_flows_expires_at"))

    op.drop_table("oauth_flows")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tenants_api_key_hash"))

    op.drop_table("tenants")
    with op.batch_alter_table("registry_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_registry_outbox_published_at"))

    op.drop_table("registry_outbox")
