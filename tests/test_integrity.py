"""Nothing lost, nothing half-stored, no 500 (issue 11), on SQLite and PostgreSQL.

A transaction is all-or-nothing even when its process is killed or a write fails; an older
version never replaces a newer one, whichever process writes last; writers of the same
resources queue (or get StorageBusy), never a 5xx; errors carry no key values.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, event, func, insert, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, select

from service.app.store import store_bundle, store_one, store_resources
from service.codebook import Codebook, load_codebook
from service.config.settings import Settings
from service.fhir.errors import FhirError
from service.storage import repository
from service.storage.db import WriterGate, make_engine, read_only, sessions
from service.storage.errors import StorageBusy
from service.storage.models import StoredResource
from tests import factories as f
from tests.api_helpers import transaction

pytestmark = pytest.mark.integration  # SQLite and PostgreSQL, subprocesses, uvicorn

T0 = "2026-11-21T08:00:00+00:00"
WAIT_S = 120  # generous: the machine may be busy; never an assertion about speed
SETTINGS = Settings(max_bundle_entries=20_000)


@pytest.fixture(scope="module")
def codebook() -> Codebook:
    return load_codebook(SETTINGS.canonical_base)


def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def observations(n: int, pid: str = "p1", **extra: Any) -> list[dict[str, Any]]:
    return [f.temperature(37.0 + i % 30 / 10, T0, id=f"t{i}", subject=f"Patient/{pid}", **extra) for i in range(n)]


def patient(pid: str, version: str, name: str) -> dict[str, Any]:
    return f.patient(pid, meta={"versionId": version}, name=[{"text": name}])


def stored_count(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(StoredResource)).one())


def stored_name(engine: Engine, pid: str) -> str:
    with Session(engine) as session:
        res = repository.read_resource(session, "Patient", pid, server="") or {}
    return str(res["name"][0]["text"])


def source_versions(engine: Engine) -> dict[str, str]:
    with Session(engine) as session:
        rows = session.exec(select(StoredResource.id, StoredResource.source_version)).all()
    return dict(rows)


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The child's stdout lines, read in a thread (so waiting on them can time out)."""
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return out


# --- a killed transaction leaves nothing -----------------------------------------------------

CHILD = """
import sys

from sqlalchemy import event
from sqlmodel import Session

from service.app.store import store_bundle
from service.codebook import load_codebook
from service.config.settings import Settings
from service.fhir.errors import FhirError
from service.storage.db import make_engine
from tests import factories as f
from tests.api_helpers import transaction

url, n, signal_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
engine = make_engine(url)
settings = Settings(max_bundle_entries=n + 1)
statements = 0


@event.listens_for(engine, "after_cursor_execute")
def written(conn, cursor, statement, *args):
    global statements
    if statement.startswith("INSERT INTO stored_resource"):
        statements += 1
        if statements == signal_after:
            # Rows this transaction wrote so far (it sees its own writes), then wait to be killed.
            rows = cursor.connection.execute("SELECT count(*) FROM stored_resource").fetchone()[0]
            print(f"written {rows}", flush=True)
            sys.stdin.readline()


resources = [f.patient("p1")] + [f.temperature(38.0, "2026-11-21T08:00:00+00:00", id=f"k{i}") for i in range(n)]
with Session(engine) as session:
    store_bundle(session, transaction(resources), load_codebook(settings.canonical_base), settings, server="")
    session.commit()
print("committed", flush=True)
"""


def test_a_transaction_killed_midway_leaves_nothing(clean_engine: Engine, repo_root: Path, tmp_path: Path) -> None:
    n = 4000
    # SQLite: four statements of 1,000 rows, killed after the second. PostgreSQL: the rows are
    # copied to a temporary table and stored by one statement, killed after it (before the commit).
    after = "1" if clean_engine.dialect.name == "postgresql" else "2"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), url_of(clean_engine), str(n), after],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    try:
        line = lines_of(proc).get(timeout=WAIT_S)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"the child never wrote: {proc.communicate()[1][-2000:]}")
    assert line.startswith("written ")
    written = int(line.split()[1])
    assert 0 < written <= n + 1  # the transaction's rows are in the database, uncommitted
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=WAIT_S)
    assert proc.returncode == -signal.SIGKILL
    fresh = make_engine(url_of(clean_engine))  # as after a restart
    try:
        assert stored_count(fresh) == 0  # nothing; never a part
    finally:
        fresh.dispose()


# --- a write that fails leaves nothing -------------------------------------------------------


def fail_after_inserts(engine: Engine, n: int) -> Callable[[], None]:
    """Make the first statement after the n-th upsert into stored_resource fail (rows are written
    by then, uncommitted); returns the undo."""
    seen = 0

    def boom(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal seen
        if seen >= n:
            raise RuntimeError("injected write failure")
        seen += statement.startswith("INSERT INTO stored_resource")

    event.listen(engine, "before_cursor_execute", boom)
    return lambda: event.remove(engine, "before_cursor_execute", boom)


def test_a_transaction_that_fails_while_writing_leaves_nothing(clean_engine: Engine, codebook: Codebook) -> None:
    doc = transaction([f.patient(), *observations(2500)])
    # SQLite: three statements of up to 1,000 rows, the third fails; PostgreSQL: one, then the next query fails.
    undo = fail_after_inserts(clean_engine, 1 if clean_engine.dialect.name == "postgresql" else 2)
    request = sessions(clean_engine)  # the API's per-request session: rolled back on error
    session = next(request)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            try:
                store_bundle(session, doc, codebook, SETTINGS, server="")
            except RuntimeError as exc:
                request.throw(exc)
    finally:
        undo()
    assert stored_count(clean_engine) == 0
    with Session(clean_engine) as session:
        store_bundle(session, doc, codebook, SETTINGS, server="")
        session.commit()
    assert stored_count(clean_engine) == 2501


def test_a_released_savepoint_commits_nothing(clean_engine: Engine) -> None:
    # pysqlite used to open the real transaction at the first SAVEPOINT and commit it at RELEASE.
    with Session(clean_engine) as session:
        with session.begin_nested():
            store_one(session, f.patient(), "Patient", "p1", load_codebook(SETTINGS.canonical_base), None, server="")
        session.rollback()
    assert stored_count(clean_engine) == 0


# --- no lost update --------------------------------------------------------------------------


def blocked_on_a_lock(engine: Engine) -> bool:
    """PostgreSQL: whether another backend of this database waits on a lock (a row lock here)."""
    with engine.connect() as conn:
        waiting = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() AND pid != pg_backend_pid()"
            )
        ).scalar()
    return bool(waiting)


@pytest.mark.parametrize("stored_before", [True, False], ids=["update", "insert"])
def test_an_older_version_written_while_a_newer_one_commits_changes_nothing(
    clean_engine: Engine, codebook: Codebook, stored_before: bool
) -> None:
    """Writer A has written version 3 and not committed; writer B then writes version 2 (B read
    the stored row before A committed, in the old code). B must wait for A and leave version 3."""
    if stored_before:
        with Session(clean_engine) as session:
            store_one(session, patient("p1", "1", "one"), "Patient", "p1", codebook, None, server="")
            session.commit()
    a_wrote, b_started = threading.Event(), threading.Event()
    outcomes: dict[str, Any] = {}

    def writer_a() -> None:
        with Session(clean_engine) as session:
            store_one(session, patient("p1", "3", "three"), "Patient", "p1", codebook, None, server="")
            a_wrote.set()
            b_started.wait(WAIT_S)
            if clean_engine.dialect.name == "postgresql":
                deadline = time.monotonic() + WAIT_S
                while not blocked_on_a_lock(clean_engine) and time.monotonic() < deadline:
                    time.sleep(0.01)  # until B waits on A's row lock: the interleaving is certain
            else:
                time.sleep(0.2)  # SQLite: B waits for the write lock (BEGIN IMMEDIATE); not observable
            session.commit()

    def writer_b() -> None:
        a_wrote.wait(WAIT_S)
        with Session(clean_engine) as session:
            b_started.set()
            outcomes["b"] = store_one(session, patient("p1", "2", "two"), "Patient", "p1", codebook, None, server="")
            session.commit()

    threads = [threading.Thread(target=writer_a), threading.Thread(target=writer_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert stored_name(clean_engine, "p1") == "three"
    b = outcomes["b"]
    assert (b.status, b.changed, b.version_id) == ("200 OK", False, 2 if stored_before else 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def two_servers(clean_engine: Engine, repo_root: Path) -> Iterator[list[str]]:
    """Two `uvicorn` processes of the app on the same database (dev auth, loopback)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(repo_root),
        "IECTOX_DATABASE_URL": url_of(clean_engine),
        "IECTOX_AUTO_MIGRATE": "false",
        "IECTOX_AUTH_MODE": "dev",
        "IECTOX_HOST": "127.0.0.1",
        "IECTOX_MAX_BODY_BYTES": "50000000",
        "IECTOX_MAX_BUNDLE_ENTRIES": "20000",
    }
    procs, bases = [], []
    for _ in range(2):
        port = free_port()
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        bases.append(f"http://127.0.0.1:{port}")
    try:
        for base, proc in zip(bases, procs, strict=True):
            deadline = time.monotonic() + WAIT_S
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"uvicorn did not start: {proc.communicate()[1][-2000:]!r}")
                time.sleep(0.05)
        yield bases
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def writing(engine: Engine) -> Callable[[], bool]:
    """Whether another connection is inside a write to stored_resource right now."""
    if engine.dialect.name == "postgresql":
        schema = engine.connect().execute(text("SELECT current_schema()")).scalar()

        def pg() -> bool:
            with engine.connect() as conn:
                return bool(
                    conn.execute(
                        text(
                            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = 'stored_resource' "
                            "AND n.nspname = :schema AND l.mode = 'RowExclusiveLock' AND l.pid != pg_backend_pid()"
                        ),
                        {"schema": schema},
                    ).scalar()
                )

        return pg
    path = engine.url.database

    def sqlite() -> bool:
        probe = sqlite3.connect(str(path), timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:  # locked: a writer holds the write lock
            return True
        finally:
            probe.close()

    return sqlite


def test_two_servers_never_store_an_older_version_over_a_newer_one(
    two_servers: list[str], clean_engine: Engine
) -> None:
    """Version 3 in a large transaction to one server; version 2, while that one is writing, to
    the other: both succeed, version 3 stays."""
    first, second = two_servers
    with httpx.Client(base_url=first, timeout=WAIT_S) as c:
        assert c.put("/fhir/Patient/p1", json=patient("p1", "1", "one")).status_code == 201
    big = transaction([patient("p1", "3", "three"), *observations(3000)])
    responses: dict[str, httpx.Response] = {}

    def send_big() -> None:
        with httpx.Client(base_url=first, timeout=WAIT_S) as c:
            responses["big"] = c.post("/fhir", json=big)

    sender = threading.Thread(target=send_big)
    sender.start()
    busy, deadline = writing(clean_engine), time.monotonic() + WAIT_S
    while sender.is_alive() and not busy() and time.monotonic() < deadline:
        time.sleep(0.002)  # until the first server writes (the older version then arrives mid-write)
    with httpx.Client(base_url=second, timeout=WAIT_S) as c:
        older = c.put("/fhir/Patient/p1", json=patient("p1", "2", "two"))
    sender.join(WAIT_S)
    assert older.status_code == 200, older.text
    assert responses["big"].status_code == 200, responses["big"].text
    with httpx.Client(base_url=second, timeout=WAIT_S) as c:
        assert c.get("/fhir/Patient/p1").json()["name"] == [{"text": "three"}]
    assert stored_name(clean_engine, "p1") == "three"


# --- concurrent writers of the same patient --------------------------------------------------


def test_concurrent_transactions_of_one_patient_queue_and_keep_the_newest(
    clean_engine: Engine, codebook: Codebook
) -> None:
    """8 threads, each a transaction of the same Patient and 300 Observations at its own
    meta.versionId, entries in its own order: they queue (no error; the old read-then-write
    deadlocked on PostgreSQL and collided on the primary key), and every resource ends at the
    newest version."""
    writers = 8
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write(k: int) -> None:
        version = str(k + 1)
        resources = [patient("p1", version, f"v{version}"), *observations(300, meta={"versionId": version})]
        random.Random(k).shuffle(resources)  # noqa: S311  (an order, not a secret)
        barrier.wait(WAIT_S)
        try:
            with Session(clean_engine) as session:
                store_bundle(session, transaction(resources), codebook, SETTINGS, server="")
                session.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    # Writers take rows in one order, so none deadlocks: each waits its turn (StorageBusy only
    # after a 30 s wait, which these do not come near).
    assert errors == [], errors
    newest = str(writers)
    assert set(source_versions(clean_engine).values()) == {newest}
    assert stored_name(clean_engine, "p1") == f"v{newest}"


def test_a_writer_that_waits_too_long_gets_storage_busy(clean_engine: Engine, codebook: Codebook) -> None:
    impatient = make_engine(url_of(clean_engine), lock_wait_s=0.2)
    try:
        with Session(clean_engine) as holder:
            store_one(holder, patient("p1", "1", "one"), "Patient", "p1", codebook, None, server="")  # holds the lock
            with Session(impatient) as session, pytest.raises(StorageBusy):
                store_one(session, patient("p1", "2", "two"), "Patient", "p1", codebook, None, server="")
            holder.rollback()
    finally:
        impatient.dispose()
    assert stored_count(clean_engine) == 0


def _queued(gate: WriterGate, n: int) -> None:
    """Wait until `n` writers queue at the gate (synchronisation, not a timing assertion)."""
    for _ in range(int(WAIT_S / 0.005)):
        if len(gate._waiting) >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"{n} writers never queued")


def test_sqlite_writers_of_one_process_are_served_in_arrival_order() -> None:
    gate = WriterGate()
    assert gate.acquire(1)
    served: list[str] = []

    def writer(name: str) -> None:
        if gate.acquire(WAIT_S):
            served.append(name)
            gate.release()

    threads = []
    for n, name in enumerate(("first", "second", "third"), start=1):
        threads.append(threading.Thread(target=writer, args=(name,)))
        threads[-1].start()
        _queued(gate, n)
    gate.release()
    for t in threads:
        t.join(WAIT_S)
    assert served == ["first", "second", "third"]
    assert gate.acquire(0)  # free again once the last one released it


def test_a_writer_that_gives_up_at_the_gate_leaves_the_queue() -> None:
    gate = WriterGate()
    assert gate.acquire(1)
    assert not gate.acquire(0.01)
    assert len(gate._waiting) == 0
    gate.release()
    assert gate.acquire(0)


class _Interrupted(threading.Event):
    def wait(self, timeout: float | None = None) -> bool:
        raise KeyboardInterrupt


def test_a_writer_interrupted_at_the_gate_neither_keeps_a_turn_nor_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = WriterGate()
    assert gate.acquire(1)
    with monkeypatch.context() as patched:
        patched.setattr(threading, "Event", _Interrupted)
        with pytest.raises(KeyboardInterrupt):
            gate.acquire(WAIT_S)
    assert len(gate._waiting) == 0
    gate.release()
    assert gate.acquire(0)


def test_a_turn_handed_over_as_its_wait_ran_out_is_kept() -> None:
    """`release` takes the next turn from the line, then wakes it: a waiter whose time ran out in
    between holds the gate (True), and nobody else does."""
    gate = WriterGate()
    assert gate.acquire(1)
    turn = threading.Event()
    gate._waiting.append(turn)
    gate._waiting.popleft()  # as `release` does before it sets the turn
    assert gate._leave(turn) is True
    assert not gate.acquire(0)  # still held: by that waiter


@pytest.mark.parametrize("ending", ["commit", "rollback", "close", "invalidate"])
def test_every_way_a_write_transaction_ends_lets_the_next_writer_in(
    clean_engine: Engine, codebook: Codebook, ending: str
) -> None:
    """The gate is held from BEGIN IMMEDIATE to the transaction's end, however it ends: a later
    writer of the same engine (waiting at most 0.5 s) gets in, never StorageBusy."""
    engine = make_engine(url_of(clean_engine), lock_wait_s=0.5)
    try:
        session = Session(engine)
        store_one(session, patient("p1", "1", "one"), "Patient", "p1", codebook, None, server="")
        if ending == "commit":
            session.commit()
        elif ending == "rollback":
            session.rollback()
        elif ending == "invalidate":  # as on a lost connection: the pool drops it, then the rollback
            session.connection().invalidate()
            session.rollback()
        session.close()
        with Session(engine) as later:
            store_one(later, patient("p2", "1", "two"), "Patient", "p2", codebook, None, server="")
            later.commit()
    finally:
        engine.dispose()
    assert stored_name(clean_engine, "p2") == "two"


def test_readers_see_the_last_commit_while_a_writer_works(clean_engine: Engine, codebook: Codebook) -> None:
    with Session(clean_engine) as session:
        store_one(session, patient("p1", "1", "one"), "Patient", "p1", codebook, None, server="")
        session.commit()
    impatient = make_engine(url_of(clean_engine), lock_wait_s=0.2)  # a wait would be StorageBusy
    try:
        with Session(clean_engine) as writer:
            store_one(writer, patient("p1", "2", "two"), "Patient", "p1", codebook, None, server="")
            with Session(read_only(impatient)) as reader:
                assert (repository.read_resource(reader, "Patient", "p1", server="") or {})["name"] == [{"text": "one"}]
            writer.commit()
    finally:
        impatient.dispose()
    assert stored_name(clean_engine, "p1") == "two"


# --- errors name no key values ---------------------------------------------------------------


def test_database_errors_carry_no_parameters_or_key_values(clean_engine: Engine) -> None:
    row = {
        "resource_type": "Patient",
        "id": "MRN-SECRET-123",
        "patient_id": "MRN-SECRET-123",
        "version_id": 1,
        "source_version": "",
        "source_last_updated": "",
        "body": b"{}",
    }
    with Session(clean_engine) as session:
        session.connection().execute(insert(StoredResource), row)
        with pytest.raises(IntegrityError) as caught:
            session.connection().execute(insert(StoredResource), row)  # the primary key again
    message = "\n".join(str(e) for e in (caught.value, caught.value.orig, caught.value.__cause__))
    assert "MRN-SECRET-123" not in message
    assert "hidden" in str(caught.value)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)  # the COPY path is PostgreSQL's
def test_a_failed_copy_is_a_database_error_and_leaves_nothing(
    clean_engine: Engine, codebook: Codebook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's COPY runs on the driver's connection: its failure is raised as SQLAlchemy's
    error (the app's 503 handlers match it), not the driver's own, and nothing is stored."""
    monkeypatch.setattr(repository, "_COPY_NEW_ROWS", "COPY iectox_no_such_table (id) FROM STDIN (FORMAT BINARY)")
    with Session(clean_engine) as session, pytest.raises(DBAPIError) as caught:
        store_resources(session, [f.patient()], codebook, server="")
    assert isinstance(caught.value.orig, psycopg.errors.UndefinedTable)
    assert stored_count(clean_engine) == 0


def test_the_test_engines_hide_parameters(engine: Engine) -> None:
    assert engine.hide_parameters  # the fixtures build engines as the service does


# --- what storage cannot keep as sent is rejected, never a 500 -------------------------------


def test_values_storage_cannot_keep_are_rejected_not_a_500(clean_engine: Engine, codebook: Codebook) -> None:
    long_version = f.temperature(38.0, T0, id="t1", meta={"versionId": "9" * 65})
    long_updated = f.temperature(38.0, T0, id="t2", meta={"lastUpdated": "2026-11-21T08:00:00" + "0" * 30 + "Z"})
    bad_meta = f.temperature(38.0, T0, id="t3", meta=["1"])
    long_subject = f.temperature(38.0, T0, id="t4", subject="Patient/" + "p" * 65)
    # Python reads this instant; PostgreSQL text holds no NUL (it failed the whole store there)
    nul_updated = f.temperature(38.0, T0, id="t5", meta={"lastUpdated": "2026-11-21T08:00:00+00:00\x00"})
    bad = [long_version, long_updated, bad_meta, long_subject, nul_updated]
    with Session(clean_engine) as session:
        with pytest.raises(FhirError) as caught:
            store_bundle(session, transaction([f.patient(), *bad]), codebook, SETTINGS, server="")
        assert caught.value.status == 422
        assert [i.expression for i in caught.value.issues] == [
            "Bundle.entry[1].resource.meta.versionId",
            "Bundle.entry[2].resource.meta.lastUpdated",
            "Bundle.entry[3].resource.meta",
            "Bundle.entry[4].resource.subject.reference",
            "Bundle.entry[5].resource.meta.lastUpdated",
        ]
        stored = store_resources(session, [f.patient(), *bad], codebook, server="")  # as read from an EHR
        session.commit()
    assert [r.outcome for r in stored.results] == ["stored", "rejected", "rejected", "rejected", "rejected", "rejected"]
    assert stored_count(clean_engine) == 1
