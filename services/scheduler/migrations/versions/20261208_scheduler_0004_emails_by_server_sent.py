"""emails by server and sent time: a server's last sent emails read by an index range

Revision ID: scheduler_0004
Revises: scheduler_0003
Create Date: 2026-12-08 00:50:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "scheduler_0004"
down_revision: str | None = "scheduler_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # On a large `emails` table the build holds writes back while it runs: an operator can
    # build it first without that lock (`CREATE INDEX CONCURRENTLY IF NOT EXISTS
    # ix_emails_server_sent ON emails (server_id, sent_at)`), and this step then finds it. A
    # concurrent build that failed leaves an INVALID index of that name, which this step would
    # take for the real one: check `pg_index.indisvalid` first, and drop and rebuild it if false.
    op.create_index("ix_emails_server_sent", "emails", ["server_id", "sent_at"], if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_emails_server_sent", table_name="emails")
