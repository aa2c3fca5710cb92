"""scheduler tables as the shared history left them at 0013

Revision ID: scheduler_0001
Revises:
Create Date: 2026-11-27 16:22:21.343243
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "scheduler_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "emails",
        sa.Column("to", sa.String(length=320), nullable=False),
        sa.Column("subject", sa.String(length=998), nullable=False),
        sa.Column("text", sa.String(), nullable=True),
        sa.Column("html", sa.String(), nullable=True),
        sa.Column("reply_to", sa.String(length=320), nullable=True),
        sa.Column("campaign", sa.String(length=100), nullable=True),
        sa.Column("sequence", sa.String(length=100), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("reserved_day", sa.Date(), nullable=True),
        sa.Column("reserved_hour", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_smtp_code", sa.Integer(), nullable=True),
        sa.Column("last_smtp_reply", sa.String(length=1000), nullable=True),
        sa.Column("unsubscribe", sa.Boolean(), nullable=False),
        sa.Column("unsubscribed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("bounce_status", sa.String(length=16), nullable=True),
        sa.Column("bounce_diagnostic", sa.String(length=1000), nullable=True),
        sa.Column("replied_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_emails_idempotency"),
    )
    with op.batch_alter_table("emails", schema=None) as batch_op:
        batch_op.create_index("ix_emails_due", ["status", "not_before"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_server_id"), ["server_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_emails_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(
            "ix_emails_tenant_status", ["tenant_id", "status", "id"], unique=False
        )

    op.create_table(
        "mailbox_cursors",
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("last_uid", sa.BigInteger(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("server_id"),
    )
    with op.batch_alter_table("mailbox_cursors", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_mailbox_cursors_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "mailbox_events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("email_id", sa.Uuid(), nullable=True),
        sa.Column("address", sa.String(length=320), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "key", name="uq_mailbox_events_key"),
    )
    with op.batch_alter_table("mailbox_events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_mailbox_events_address", ["tenant_id", "address", "kind", "at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_mailbox_events_server_id"), ["server_id"], unique=False
        )

    op.create_table(
        "scheduler_outbox",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("scheduler_outbox", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_scheduler_outbox_published_at"), ["published_at"], unique=False
        )

    op.create_table(
        "sending_profiles",
        sa.Column("time_zone", sa.String(length=64), nullable=False),
        sa.Column("start_hour", sa.Integer(), nullable=False),
        sa.Column("end_hour", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    op.create_table(
        "server_days",
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("allowance", sa.Integer(), nullable=False),
        sa.Column("reserved", sa.Integer(), nullable=False),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("server_id", "day"),
    )
    with op.batch_alter_table("server_days", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_server_days_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "server_usage_hours",
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("server_id", "hour"),
    )
    op.create_table(
        "server_warmup",
        sa.Column("server_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("state_day", sa.Date(), nullable=False),
        sa.Column("idle_days", sa.Integer(), nullable=False),
        sa.Column("parked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("park_reason", sa.String(length=200), nullable=True),
        sa.Column("pace_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("server_id"),
    )
    with op.batch_alter_table("server_warmup", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_server_warmup_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "suppressions",
        sa.Column("address", sa.String(length=320), nullable=True),
        sa.Column("domain", sa.String(length=253), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "address", name="uq_suppressions_address"),
        sa.UniqueConstraint("tenant_id", "domain", name="uq_suppressions_domain"),
    )
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_suppressions_tenant_id"), ["tenant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_suppressions_tenant_id"))

    op.drop_table("suppressions")
    with op.batch_alter_table("server_warmup", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_server_warmup_tenant_id"))

    op.drop_table("server_warmup")
    op.drop_table("server_usage_hours")
    with op.batch_alter_table("server_days", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_server_days_tenant_id"))

    op.drop_table("server_days")
    op.drop_table("sending_profiles")
    with op.batch_alter_table("scheduler_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_scheduler_outbox_published_at"))

    op.drop_table("scheduler_outbox")
    with op.batch_alter_table("mailbox_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mailbox_events_server_id"))
        batch_op.drop_index("ix_mailbox_events_address")

    op.drop_table("mailbox_events")
    with op.batch_alter_table("mailbox_cursors", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mailbox_cursors_tenant_id"))

    op.drop_table("mailbox_cursors")
    with op.batch_alter_table("emails", schema=None) as batch_op:
        batch_op.drop_index("ix_emails_tenant_status")
        batch_op.drop_index(batch_op.f("ix_emails_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_emails_server_id"))
        batch_op.drop_index("ix_emails_due")

    op.drop_table("emails")
