"""The request id of the evaluation an outbox row delivers (the worker's log lines carry it).

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


def downgrade() -> None:
    op.drop_column("outbox", "request_id")
