"""The API's SQLite WAL is checkpointed by a background thread (storage.db.WalCheckpointer), not
by the commit of whichever request crosses SQLite's page mark: its connections never checkpoint
on commit, the thread copies the WAL into the database, and stopping it checkpoints what is left.
PostgreSQL needs none of it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from service.storage.db import WalCheckpointer, make_engine
from tests.conftest import PG_URL

WAIT_S = 30.0  # generous: a busy 2-core machine; nothing here measures speed


def _write(engine: Engine, rows: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB)"))
        conn.execute(text("INSERT INTO t (body) VALUES (:b)"), [{"b": b"x" * 2000} for _ in range(rows)])


def _until(check: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_sqlite_checkpoints_in_the_background(tmp_path: Path) -> None:
    db = tmp_path / "wal.db"
    engine = make_engine(f"sqlite:///{db}")
    _write(engine, 1)
    checkpointer = WalCheckpointer(engine, interval_s=0.05)
    checkpointer.start()
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        before = db.stat().st_size
        _write(engine, 2000)  # about 1,000 pages: more than SQLite's own mark, left to the thread
        _until(lambda: db.stat().st_size > before + 2_000_000, "the thread copied the WAL into the database")
    finally:
        checkpointer.stop()
    engine.dispose()


def test_stop_checkpoints_what_is_left(tmp_path: Path) -> None:
    db = tmp_path / "wal.db"
    engine = make_engine(f"sqlite:///{db}")
    checkpointer = WalCheckpointer(engine, interval_s=3600)  # the thread never gets to it
    checkpointer.start()
    before = db.stat().st_size if db.exists() else 0
    _write(engine, 1000)
    checkpointer.stop()
    assert db.stat().st_size > before + 1_000_000
    engine.dispose()


@pytest.mark.integration
def test_postgresql_needs_no_checkpointer() -> None:
    engine = make_engine(PG_URL)
    checkpointer = WalCheckpointer(engine, interval_s=0.05)
    checkpointer.start()
    assert checkpointer._thread is None
    checkpointer.stop()
    engine.dispose()


def test_after_stop_commits_checkpoint_again_and_memory_databases_are_left_alone(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    checkpointer = WalCheckpointer(engine, interval_s=3600)
    checkpointer.start()
    checkpointer.stop()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000  # SQLite's own again
    engine.dispose()
    memory = make_engine("sqlite://")
    _write(memory, 1)
    kept = WalCheckpointer(memory, interval_s=0.05)
    kept.start()  # disposing its pool would lose the database
    assert kept._thread is None
    with memory.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1
    memory.dispose()
