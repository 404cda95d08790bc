"""EHR integration: outbox, audit log, seen JWT ids, CDS feedback, watched patients.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("claimed_until", TS, nullable=True),
        sa.Column("last_error", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("delivered_at", TS, nullable=True),
    )
    op.create_index("ix_outbox_patient_id", "outbox", ["patient_id"])
    op.create_index("ix_outbox_status", "outbox", ["status"])
    op.create_index("ix_outbox_next_attempt_at", "outbox", ["next_attempt_at"])
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("recorded", TS, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("route", sa.String(128), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=True),
        sa.Column("resource_id", sa.String(64), nullable=True),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer, nullable=False),
    )
    op.create_index("ix_audit_event_recorded", "audit_event", ["recorded"])
    op.create_index("ix_audit_event_patient_id", "audit_event", ["patient_id"])
    op.create_table(
        "seen_token",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("expires", TS, nullable=False),
    )
    op.create_index("ix_seen_token_expires", "seen_token", ["expires"])
    op.create_table(
        "cds_feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("received", TS, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_cds_feedback_service_id", "cds_feedback", ["service_id"])
    op.create_table(
        "watched_patient",
        sa.Column("target", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(64), primary_key=True),
        sa.Column("checkpoint", sa.String(40), nullable=False),
        sa.Column("updated", TS, nullable=False),
    )


def downgrade() -> None:
    for table in ("watched_patient", "cds_feedback", "seen_token", "audit_event", "outbox"):
        op.drop_table(table)
