"""Initial schema: stored input resources and emitted assessments.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_resource",
        sa.Column("resource_type", sa.String(64), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("source_version", sa.String(64), nullable=False),
        sa.Column("source_last_updated", sa.String(40), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_stored_resource_patient_id", "stored_resource", ["patient_id"])
    op.create_table(
        "emitted_resource",
        sa.Column("resource_type", sa.String(64), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("method", sa.String(64), nullable=True),
        sa.Column("code", sa.String(64), nullable=True),
        sa.Column("occurrence", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_emitted_resource_patient_id", "emitted_resource", ["patient_id"])
    op.create_index("ix_emitted_resource_method", "emitted_resource", ["method"])
    op.create_index("ix_emitted_resource_occurrence", "emitted_resource", ["occurrence"])


def downgrade() -> None:
    op.drop_table("emitted_resource")
    op.drop_table("stored_resource")
