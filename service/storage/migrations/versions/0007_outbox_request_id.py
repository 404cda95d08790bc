"""Request ids: of the evaluation an outbox row delivers (the worker's log lines carry it), and of
the request an audit row records (the AuditEvent's transaction entity).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("request_id", sa.String(128), nullable=False, server_default=""))
    op.add_column("audit_event", sa.Column("request_id", sa.String(128), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("audit_event", "request_id")
    op.drop_column("outbox", "request_id")
