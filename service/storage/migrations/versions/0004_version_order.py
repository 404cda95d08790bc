"""Version order columns on stored_resource, so the upsert compares versions in SQL.

Revision ID: 0004
Revises: 0003
"""

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Frozen copy of service.fhir.ingest.version_key_of as of this revision (migrations import no app code).
MAX_VERSION_NUMBER = 2**63 - 1
NO_INSTANT = -(10**17)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _number(version: str) -> int:
    return min(int(version), MAX_VERSION_NUMBER) if version.isascii() and version.isdigit() else -1


def _instant(raw: str) -> int:
    try:
        t = datetime.fromisoformat(raw)
        return (t - EPOCH) // timedelta(microseconds=1) if t.tzinfo is not None else NO_INSTANT
    except (ValueError, OverflowError):
        return NO_INSTANT


def upgrade() -> None:
    with op.batch_alter_table("stored_resource") as batch:
        batch.add_column(sa.Column("version_number", sa.BigInteger, nullable=False, server_default=sa.text("-1")))
        batch.add_column(
            sa.Column("updated_us", sa.BigInteger, nullable=False, server_default=sa.text(str(NO_INSTANT)))
        )
    table = sa.table(
        "stored_resource",
        sa.column("resource_type", sa.String),
        sa.column("id", sa.String),
        sa.column("source_version", sa.String),
        sa.column("source_last_updated", sa.String),
        sa.column("version_number", sa.BigInteger),
        sa.column("updated_us", sa.BigInteger),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(table.c.resource_type, table.c.id, table.c.source_version, table.c.source_last_updated).where(
            (table.c.source_version != "") | (table.c.source_last_updated != "")
        )
    ).all()
    if rows:
        conn.execute(
            table.update()
            .where(table.c.resource_type == sa.bindparam("k_type"), table.c.id == sa.bindparam("k_id"))
            .values(version_number=sa.bindparam("number"), updated_us=sa.bindparam("instant")),
            [{"k_type": t, "k_id": i, "number": _number(v), "instant": _instant(u)} for t, i, v, u in rows],
        )


def downgrade() -> None:
    with op.batch_alter_table("stored_resource") as batch:
        batch.drop_column("updated_us")
        batch.drop_column("version_number")
