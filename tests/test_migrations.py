"""The Alembic migrations build exactly the schema the models declare (no drift), and migrate
stored data."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text
from sqlmodel import Session, SQLModel

from service.app.store import store_one
from service.codebook import load_codebook
from service.config.settings import Settings
from service.fhir.ingest import version_key_of
from service.storage import repository
from service.storage.db import MIGRATIONS, make_engine, migrate, normalise_url
from tests import factories as f
from tests.conftest import PG_URL, pg_url

pytestmark = pytest.mark.integration  # SQLite and PostgreSQL


def test_models_match_migrations(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == [], diff


@pytest.fixture(params=["sqlite", "postgresql"])
def old_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database of its own (a SQLite file, or a PostgreSQL schema), to migrate step by step."""
    schema = f"iectox_mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalise_url(PG_URL))
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    else:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        engine = make_engine(pg_url(schema))
    try:
        yield engine
    finally:
        engine.dispose()
        if request.param == "postgresql":
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def test_0004_gives_rows_stored_before_it_their_version_order(old_engine: Engine) -> None:
    """Rows stored before the version order columns get them from what was sent, so an older
    version sent afterwards still changes nothing."""
    sent = {"a": ("10", ""), "b": ("", "2026-01-05T10:00:00+01:00"), "c": ("x7", "junk"), "d": ("", "")}
    migrate(old_engine, "0003")
    with old_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO stored_resource (resource_type, id, patient_id, version_id, source_version,"
                " source_last_updated, body) VALUES ('Observation', :id, 'p1', 1, :v, :u, :body)"
            ),
            [{"id": rid, "v": v, "u": u, "body": b"{}"} for rid, (v, u) in sent.items()],
        )
    migrate(old_engine)
    with old_engine.connect() as conn:
        rows = conn.execute(text("SELECT id, version_number, updated_us FROM stored_resource")).all()
    assert {rid: (n, us) for rid, n, us in rows} == {rid: version_key_of(v, u)[::2] for rid, (v, u) in sent.items()}
    codebook = load_codebook(Settings().canonical_base)
    older = f.temperature(39.0, "2026-11-21T08:00:00+00:00", id="a", meta={"versionId": "9"})
    with Session(old_engine) as session:
        out = store_one(session, older, "Observation", "a", codebook, None, server="")
        session.commit()
    assert (out.changed, out.version_id) == (False, 1)


def test_0008_keeps_stored_rows_under_the_home_namespace_and_keys_by_server(old_engine: Engine) -> None:
    """Rows stored before several EHRs were keyed stay readable as the namespace "" (API clients);
    afterwards another server's resource of the same type and id is a second row. The downgrade
    (with only "" rows left) gives the old key back."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    migrate(old_engine, "0007")
    with old_engine.begin() as conn:  # as the 0007 code stored it
        conn.execute(
            text(
                "INSERT INTO stored_resource (resource_type, id, patient_id, version_id, source_version,"
                " source_last_updated, body) VALUES ('Patient', :id, :id, 1, '', '', :body)"
            ),
            {"id": f.PATIENT_ID, "body": orjson.dumps(f.patient())},
        )
    migrate(old_engine)
    with Session(old_engine) as session:
        assert repository.read_resource(session, "Patient", f.PATIENT_ID, server="") is not None
        other = f.patient(birth_date="1990-05-05")
        store_one(session, other, "Patient", f.PATIENT_ID, load_codebook(Settings().canonical_base), None, server="a")
        session.commit()
        assert (repository.read_resource(session, "Patient", f.PATIENT_ID, server="a") or {})[
            "birthDate"
        ] == "1990-05-05"
        assert (repository.read_resource(session, "Patient", f.PATIENT_ID, server="") or {})[
            "birthDate"
        ] == "1970-01-01"
    with pytest.raises(RuntimeError, match="other EHR servers"), old_engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")  # it would merge a's Patient/p1 into the home namespace's
    with old_engine.begin() as conn:
        conn.execute(text("DELETE FROM stored_resource WHERE server = 'a'"))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")
    with old_engine.connect() as conn:
        assert conn.execute(text("SELECT resource_type, id FROM stored_resource")).all() == [("Patient", f.PATIENT_ID)]
