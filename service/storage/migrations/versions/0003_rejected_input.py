"""Rejected inputs: resources read from an EHR that storage could not use, kept to be named.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejected_input",
        sa.Column("resource_type", sa.String(64), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("source_version", sa.String(64), nullable=False),
        sa.Column("source_last_updated", sa.String(40), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_rejected_input_patient_id", "rejected_input", ["patient_id"])


def downgrade() -> None:
    op.drop_index("ix_rejected_input_patient_id", "rejected_input")
    op.drop_table("rejected_input")
