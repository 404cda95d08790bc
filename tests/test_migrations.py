"""The Alembic migrations build exactly the schema the models declare (no drift), and migrate
stored data."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text
from sqlmodel import Session, SQLModel

from service.app.store import store_one
from service.codebook import load_codebook
from service.config.settings import Settings
from service.fhir.ingest import version_key_of
from service.storage.db import make_engine, migrate, normalise_url
from tests import factories as f
from tests.conftest import PG_URL, pg_url

pytestmark = pytest.mark.integration  # SQLite and PostgreSQL


def test_models_match_migrations(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == [], diff


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_0004_gives_rows_stored_before_it_their_version_order(kind: str, tmp_path: Path) -> None:
    """Rows stored before the version order columns get them from what was sent, so an older
    version sent afterwards still changes nothing."""
    schema = f"iectox_mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalise_url(PG_URL))
    if kind == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    else:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        engine = make_engine(pg_url(schema))
    sent = {"a": ("10", ""), "b": ("", "2026-01-05T10:00:00+01:00"), "c": ("x7", "junk"), "d": ("", "")}
    try:
        migrate(engine, "0003")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO stored_resource (resource_type, id, patient_id, version_id, source_version,"
                    " source_last_updated, body) VALUES ('Observation', :id, 'p1', 1, :v, :u, :body)"
                ),
                [{"id": rid, "v": v, "u": u, "body": b"{}"} for rid, (v, u) in sent.items()],
            )
        migrate(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, version_number, updated_us FROM stored_resource")).all()
        assert {rid: (n, us) for rid, n, us in rows} == {rid: version_key_of(v, u)[::2] for rid, (v, u) in sent.items()}
        codebook = load_codebook(Settings().canonical_base)
        older = f.temperature(39.0, "2026-11-21T08:00:00+00:00", id="a", meta={"versionId": "9"})
        with Session(engine) as session:
            out = store_one(session, older, "Observation", "a", codebook, None)
            session.commit()
        assert (out.changed, out.version_id) == (False, 1)
    finally:
        engine.dispose()
        if kind == "postgresql":
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
