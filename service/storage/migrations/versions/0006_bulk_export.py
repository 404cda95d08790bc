"""FHIR Bulk Data export of stored results: when each emitted version was stored, and export jobs.

Revision ID: 0006
Revises: 0005
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("emitted_resource", sa.Column("updated", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_emitted_resource_updated", "emitted_resource", ["updated"])
    # Rows stored before this revision: their store time is unknown, so they count as stored now
    # (an export `_since` an earlier time still holds them; none is left out).
    op.execute(sa.text("UPDATE emitted_resource SET updated = :now").bindparams(now=datetime.now(UTC)))
    op.create_table(
        "export_job",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("types", sa.String(256), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("request", sa.String(2048), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.String(200), nullable=False),
    )
    op.create_table(
        "export_file",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("export_file")
    op.drop_table("export_job")
    op.drop_index("ix_emitted_resource_updated", "emitted_resource")
    op.drop_column("emitted_resource", "updated")
