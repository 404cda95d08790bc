"""Several EHRs at once: stored inputs, kept rejections, emitted results and the CDS answer state
are keyed by the EHR server they came from ("" = sent to this service by an API client), so two
servers' Patient/123 never meet; audit rows and export jobs name it too. Existing rows get ""
(they were stored under one namespace).

Revision ID: 0008
Revises: 0007
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

KEYED = {
    "stored_resource": ["server", "resource_type", "id"],
    "rejected_input": ["server", "resource_type", "id"],
    "cds_last_answer": ["server", "patient_id", "hook", "user_id"],
}
UNKEYED = ["cds_card", "audit_event", "export_job"]  # the server as a plain column


@contextmanager
def _new_key_on_copy() -> Iterator[None]:
    """The copy of a table gets the new primary key: SQLAlchemy says so with a warning (the old
    key's columns were reflected as key columns), which is exactly what is asked here."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Table '_alembic_tmp_.*' specifies columns", category=sa.exc.SAWarning
        )
        yield


def _server() -> sa.Column:
    return sa.Column("server", sa.String(64), nullable=False, server_default="")


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table, key in KEYED.items():
        if postgres:
            op.add_column(table, _server())
            op.drop_constraint(f"{table}_pkey", table, type_="primary")
            op.create_primary_key(f"{table}_pkey", table, key)
        else:  # SQLite changes a primary key by copying the table
            with _new_key_on_copy(), op.batch_alter_table(table, recreate="always") as batch:
                batch.add_column(_server())
                batch.create_primary_key(f"{table}_pkey", key)
    op.add_column("emitted_resource", _server())
    op.create_index("ix_emitted_resource_server", "emitted_resource", ["server"])
    for table in UNKEYED:
        op.add_column(table, _server())


def downgrade() -> None:
    bind = op.get_bind()
    for table in [*KEYED, "emitted_resource", "cds_card", "audit_event"]:
        # Another server's rows would collide with, or be read as, the home namespace's.
        rows = sa.table(table, sa.column("server"))
        if bind.execute(sa.select(sa.literal(1)).select_from(rows).where(rows.c.server != "").limit(1)).first():
            raise RuntimeError(
                f"{table} holds data of other EHR servers than the home server: delete them (server <> '') "
                "before going back below 0008, which keys by type and id alone"
            )
    postgres = bind.dialect.name == "postgresql"
    for table in UNKEYED:
        op.drop_column(table, "server")
    op.drop_index("ix_emitted_resource_server", "emitted_resource")
    op.drop_column("emitted_resource", "server")
    for table, key in KEYED.items():
        rest = [c for c in key if c != "server"]
        if postgres:
            op.drop_constraint(f"{table}_pkey", table, type_="primary")
            op.create_primary_key(f"{table}_pkey", table, rest)
            op.drop_column(table, "server")
        else:
            with _new_key_on_copy(), op.batch_alter_table(table, recreate="always") as batch:
                batch.create_primary_key(f"{table}_pkey", rest)
                batch.drop_column("server")
