"""Engine construction, transactions and Alembic migrations.

Every transaction is all-or-nothing, on both databases:
- SQLite: pysqlite's own transaction handling is off (with it, the first SAVEPOINT opened the
  real transaction and its RELEASE committed it); every transaction starts `BEGIN IMMEDIATE`, so
  a writer takes the write lock up front and waits (busy_timeout) for another writer instead of
  failing when it upgrades a read. Savepoints nest inside it. WAL: readers on `read_only(engine)`
  (plain `BEGIN`) see the last commit while a writer works. The writers of one engine queue in
  arrival order (WriterGate) before their BEGIN IMMEDIATE rather than in SQLite's busy handler.
- PostgreSQL: READ COMMITTED; a lock wait is bounded by lock_timeout.
A wait that runs out, a deadlock or a serialisation failure is raised as StorageBusy. Engines
hide statement parameters (and PostgreSQL's DETAIL lines, which quote key values) from
exception messages: they reach the logs.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext
from sqlmodel import Session

from ..observe import traces
from .errors import StorageBusy

log = logging.getLogger("iectox.storage")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LOCK_WAIT_S = 30  # how long a writer waits for another before StorageBusy
READ_ONLY = "iectox_read_only"  # execution option: SQLite starts a deferred transaction

SQLITE_BUSY, SQLITE_LOCKED = 5, 6
# PostgreSQL SQLSTATEs worth a retry: serialization_failure, deadlock_detected, lock_not_available.
RETRY_SQLSTATES = {"40001": "serialisation conflict", "40P01": "deadlock", "55P03": "lock timeout"}


def normalise_url(url: str) -> str:
    # PostgreSQL goes through psycopg 3 (the psycopg2 default driver is not installed).
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, *, lock_wait_s: float = LOCK_WAIT_S) -> Engine:
    """`lock_wait_s`: how long a statement waits for another writer's lock before StorageBusy."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, hide_parameters=True, connect_args={"check_same_thread": False, "timeout": lock_wait_s}
        )
        event.listen(engine, "connect", partial(_sqlite_connect, lock_wait_s))
        # A database in memory is one connection's own: no other writer to queue behind.
        gate = WriterGate() if engine.url.database not in (None, "", ":memory:") else None
        event.listen(engine, "begin", partial(_sqlite_begin, gate, lock_wait_s))
        if gate is not None:
            for name in ("commit", "rollback"):
                event.listen(engine, name, partial(_sqlite_end, gate))
            for name in ("checkin", "reset", "invalidate", "close"):  # a transaction that ended otherwise
                event.listen(engine.pool, name, partial(_sqlite_returned, gate))
    else:
        engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
        event.listen(engine, "connect", partial(_postgres_connect, lock_wait_s))
    event.listen(engine, "handle_error", _translate_error)
    if traces.on():  # statements are traced when traces were on before the engine was made
        event.listen(engine, "before_cursor_execute", _trace_start)
        event.listen(engine, "after_cursor_execute", _trace_end)
        event.listen(engine, "handle_error", _trace_error)  # a failed statement's span ends too
    return engine


def _trace_start(conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool) -> None:
    # The statement's first word and table only: parameters (patient data) are never recorded.
    verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "SQL"
    context._iectox_span = traces.start(f"db {verb}", **{"db.system": conn.dialect.name, "db.operation": verb})


def _trace_end(_conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool) -> None:
    traces.end(getattr(context, "_iectox_span", None))
    context._iectox_span = None


def _trace_error(ctx: ExceptionContext) -> None:
    span = getattr(ctx.execution_context, "_iectox_span", None)
    if span is not None:
        traces.fail(span, type(ctx.original_exception).__name__)
        ctx.execution_context._iectox_span = None  # type: ignore[union-attr]


def read_only(engine: Engine) -> Engine:
    """The same engine for sessions that only read: on SQLite they start a deferred transaction
    (no write lock), so they run beside a writer (WAL). A write in one may raise StorageBusy."""
    return engine.execution_options(**{READ_ONLY: True})


def _sqlite_connect(lock_wait_s: float, dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # pysqlite emits no BEGIN/COMMIT of its own (_sqlite_begin does)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={int(lock_wait_s * 1000)}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class WalCheckpointer:
    """SQLite: the WAL is copied back into the database by a background thread every
    `interval_s`, not by whichever commit crosses SQLite's 1,000-page mark. A new CDS patient's
    commit writes about 700 pages, so every other one paid the checkpoint and its fsync inside the
    hook (measured: commits of 4 and 12 ms, alternating; bench/cds.py). Connections made while it
    runs leave checkpoints to the thread, which has a connection of its own; PASSIVE checkpoints
    never wait for readers or writers. PostgreSQL and in-memory SQLite: nothing to do."""

    FAILURES_LOGGED_EVERY = 60

    def __init__(self, engine: Engine, interval_s: float = 1.0) -> None:
        self.engine, self.interval_s = engine, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    def start(self) -> None:
        url = self.engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or self._thread is not None:
            return
        event.listen(self.engine, "connect", _no_autocheckpoint)
        self.engine.dispose()  # pooled connections were made checkpointing on commit
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="iectox-wal-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        event.remove(self.engine, "connect", _no_autocheckpoint)
        self.engine.dispose()  # connections made from now on checkpoint on commit again
        self.checkpoint()  # what the last commits wrote

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.checkpoint()

    def checkpoint(self) -> None:
        """One PASSIVE checkpoint on a connection of its own (never one a request waits for)."""
        try:
            conn = sqlite3.connect(str(self.engine.url.database), timeout=1.0, isolation_level=None)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                conn.close()
            self._failures = 0
        except sqlite3.Error as exc:  # the next pass tries again; said once a minute while it fails
            if self._failures % self.FAILURES_LOGGED_EVERY == 0:
                log.error("WAL checkpoint failing (%d in a row): %s", self._failures + 1, type(exc).__name__)
            self._failures += 1


def _no_autocheckpoint(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA wal_autocheckpoint=0")
    cur.close()


class WriterGate:
    """SQLite has one writer at a time. Its busy handler polls for the write lock with growing
    sleeps (up to 100 ms) and lets whichever waiter polls first in, so under concurrent writers a
    waiting one can lose round after round (measured: four concurrent new-patient CDS hooks, most
    done in 0.3 s and some after 2.5-3.3 s; bench/cds.py). The writers of one process queue here
    instead, in arrival order, and each is handed the gate the moment the one before it ends
    (other processes still meet SQLite's own lock). Held from BEGIN IMMEDIATE to COMMIT or ROLLBACK."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiting: deque[threading.Event] = deque()

    # Nothing the collector tracks is made while `_mutex` is held: a connection the collector
    # finds unreferenced is returned to the pool from inside the collection, on whatever thread
    # it runs, and its return releases the gate (`_sqlite_returned`), which takes `_mutex` too.

    def acquire(self, timeout_s: float) -> bool:
        turn = threading.Event()
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            self._waiting.append(turn)
        try:
            if turn.wait(timeout_s):
                return True
        except BaseException:  # interrupted while waiting: never keep a turn, or a gate, nobody uses
            if self._leave(turn):
                self.release()
            raise
        return self._leave(turn)

    def _leave(self, turn: threading.Event) -> bool:
        """Stop waiting: True when the gate was handed over meanwhile (the caller now holds it)."""
        with self._mutex:
            if turn in self._waiting:
                self._waiting.remove(turn)
                return False
        return True  # `release` took this turn from the line: the gate is this caller's

    def release(self) -> None:
        with self._mutex:
            nxt = self._waiting.popleft() if self._waiting else None
            if nxt is None:
                self._held = False
        if nxt is not None:
            nxt.set()  # the gate passes on: it is never free in between


GATE_HELD = "iectox_writer_gate"  # in a pooled connection's info while its transaction holds the gate


def _sqlite_begin(gate: WriterGate | None, lock_wait_s: float, conn: Connection) -> None:
    if conn.get_execution_options().get(READ_ONLY):
        conn.exec_driver_sql("BEGIN")
        return
    if gate is None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        return
    if not gate.acquire(lock_wait_s):
        raise StorageBusy("database locked")
    conn.info[GATE_HELD] = True
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        _sqlite_end(gate, conn)
        raise


def _sqlite_end(gate: WriterGate, conn: Connection) -> None:
    """The transaction commits or rolls back now: the next writer in line may begin (its BEGIN
    IMMEDIATE waits the few milliseconds of this COMMIT in SQLite's busy handler)."""
    # An invalidated connection has no info to read; the pool's invalidate event released it.
    if not conn.invalidated and conn.info.pop(GATE_HELD, False):
        gate.release()


def _sqlite_returned(gate: WriterGate, _dbapi_conn: Any, record: Any, *_: Any) -> None:
    """A connection back in (or out of) the pool without its transaction's commit or rollback
    event: the gate is never left held by a connection that no longer writes."""
    if record is not None and record.info.pop(GATE_HELD, False):
        gate.release()


def _postgres_connect(lock_wait_s: float, dbapi_conn: Any, _record: Any) -> None:
    with dbapi_conn.cursor() as cur:
        cur.execute(f"SET lock_timeout = {int(lock_wait_s * 1000)}")  # ms
    dbapi_conn.commit()  # else the pool's reset-on-return rolls the SET back


def _translate_error(ctx: ExceptionContext) -> StorageBusy | None:
    orig = ctx.original_exception
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED):
        return StorageBusy("database locked")
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in RETRY_SQLSTATES:
        return StorageBusy(RETRY_SQLSTATES[sqlstate])
    primary = getattr(getattr(orig, "diag", None), "message_primary", None)
    if primary and ctx.sqlalchemy_exception is not None:
        # PostgreSQL's DETAIL names key values (patient ids): keep the primary message only.
        orig.args = (primary,)
        ctx.sqlalchemy_exception.args = (f"({type(orig).__module__}.{type(orig).__name__}) {primary}",)
    return None


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to the latest (or the given) Alembic revision (idempotent)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def ping(engine: Engine) -> None:
    with read_only(engine).connect() as conn:
        conn.execute(text("SELECT 1"))


def sessions(engine: Engine) -> Iterator[Session]:
    """One session per request: committed at the end, rolled back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
