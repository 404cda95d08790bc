"""Cards returned to CDS clients (counted by the feedback report) and the last answer to each
hook per patient and user (compared by the quiet rule).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cds_card",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("uuid", sa.String(64), nullable=False, unique=True),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("hook", sa.String(32), nullable=False),
        sa.Column("card_type", sa.String(32), nullable=False),
        sa.Column("indicator", sa.String(16), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issued", sa.DateTime(timezone=True), nullable=False),
        sa.Column("grades", sa.String(512), nullable=False),
    )
    op.create_index("ix_cds_card_patient_id", "cds_card", ["patient_id"])
    op.create_index("ix_cds_card_issued", "cds_card", ["issued"])
    op.create_table(
        "cds_last_answer",
        sa.Column("patient_id", sa.String(64), primary_key=True),
        sa.Column("hook", sa.String(32), primary_key=True),
        sa.Column("user_id", sa.String(256), primary_key=True),
        sa.Column("state", sa.String(1024), nullable=False),
        sa.Column("answered", sa.DateTime(timezone=True), nullable=False),
        sa.Column("shown", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("cds_last_answer")
    op.drop_index("ix_cds_card_issued", "cds_card")
    op.drop_index("ix_cds_card_patient_id", "cds_card")
    op.drop_table("cds_card")
