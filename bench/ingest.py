"""Benchmark: storing a ~7,000-resource transaction Bundle on SQLite (a file, WAL) and PostgreSQL.

- database part: `repository.upsert_resources` of the prepared rows plus the commit: into an
  empty table (inserts), then a newer version of every resource (updates), then the same again
  (unchanged);
- end to end: `store_bundle` (plan, check every entry, upsert, response Bundle) plus the commit;
- SQLite readers beside that writer: how many reads another process completes while the
  database part of a store runs (from Session to commit), and the slowest, for sessions on
  `read_only(engine)` (a deferred BEGIN: never waits) and on the engine itself (BEGIN IMMEDIATE:
  a reader waits for the writer, and a stream of readers delays the writer's BEGIN).
Target (issue 11): at least 15,000 resources/s for the database part on SQLite.

Run: .venv/bin/python bench/ingest.py [--repeat N] [--postgres URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlmodel import Session, SQLModel

from service.app.store import new_version, store_bundle
from service.codebook import load_codebook
from service.config.settings import Settings
from service.devtools.synth import generate_patient
from service.fhir.ingest import Entry, check_for_storage
from service.storage import repository
from service.storage.db import make_engine, migrate, normalise_url, read_only

TARGET_SQLITE = 15_000  # resources/s, database part
PG_DEFAULT = os.environ.get("IECTOX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def bundle(settings: Settings) -> dict[str, Any]:
    start = datetime(2026, 1, 5, 8, tzinfo=UTC)
    patient = generate_patient(
        random.Random(42), 0, "crs-4", days=10, base=settings.canonical_base, start=start, vitals_every_min=15
    )
    return patient.bundle


def newer(doc: dict[str, Any]) -> dict[str, Any]:
    """Every resource at meta.versionId + 1 (a changed body)."""
    out = copy.deepcopy(doc)
    for e in out["entry"]:
        meta = e["resource"].setdefault("meta", {})
        meta["versionId"] = str(int(meta.get("versionId") or "1") + 1)
    return out


def empty(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rate(n: int, times: list[float]) -> str:
    best, med = min(times), statistics.median(times)
    return f"best {n / best:9,.0f}/s ({best * 1e3:6.1f} ms)  median {n / med:9,.0f}/s"


def run(name: str, engine: Engine, doc: dict[str, Any], settings: Settings, repeat: int) -> float:
    codebook = load_codebook(settings.canonical_base)
    site_tz = settings.site_tz()
    versions = {}
    for label, d in (("v1", doc), ("v2", newer(doc))):
        items = []
        for e in d["entry"]:
            patient_id, issues = check_for_storage(Entry(e["resource"], "bench"), codebook, site_tz)
            assert not issues, issues
            items.append(new_version(e["resource"], patient_id, ""))
        versions[label] = items
    n = len(versions["v1"])

    def upsert(items: list[repository.NewVersion]) -> None:
        with Session(engine) as session:
            repository.upsert_resources(session, items)
            session.commit()

    def store(d: dict[str, Any]) -> None:
        with Session(engine) as session:
            store_bundle(session, d, codebook, settings, server="")
            session.commit()

    inserts, updates, unchanged, e2e = [], [], [], []
    for _ in range(repeat):
        empty(engine)
        inserts.append(timed(lambda: upsert(versions["v1"])))
        updates.append(timed(lambda: upsert(versions["v2"])))
        unchanged.append(timed(lambda: upsert(versions["v2"])))
        empty(engine)
        e2e.append(timed(lambda: store(doc)))
    print(f"{name}: {n} resources")
    print(f"  database part, inserts   : {rate(n, inserts)}")
    print(f"  database part, updates   : {rate(n, updates)}")
    print(f"  database part, unchanged : {rate(n, unchanged)}")
    print(f"  end to end (store_bundle): {rate(n, e2e)}")
    return n / min(inserts)


def _read_loop(url: str, read_only_engine: bool, pid: str, out: Any, ready: Any, stop: Any) -> None:
    """A reader process (no GIL shared with the writer): (end time, latency) of each read."""
    engine = make_engine(url)
    reader = read_only(engine) if read_only_engine else engine
    times = []
    while not stop.is_set():
        t0 = time.perf_counter()
        with Session(reader) as session:
            repository.read_resource(session, "Patient", pid, server="")
        t1 = time.perf_counter()
        times.append((t1, t1 - t0))
        ready.set()
    out.put(times)


def readers(url: str, engine: Engine, doc: dict[str, Any], settings: Settings) -> None:
    """Reads in another process while the database part of a store (upsert + commit) runs."""
    codebook = load_codebook(settings.canonical_base)
    site_tz = settings.site_tz()
    pid = next(e["resource"]["id"] for e in doc["entry"] if e["resource"]["resourceType"] == "Patient")
    items = []
    for e in newer(doc)["entry"]:
        patient_id, _ = check_for_storage(Entry(e["resource"], "bench"), codebook, site_tz)
        items.append(new_version(e["resource"], patient_id, ""))
    for label, deferred in (("read_only(engine)", True), ("engine (BEGIN IMMEDIATE)", False)):
        empty(engine)
        with Session(engine) as session:
            store_bundle(session, doc, codebook, settings, server="")
            session.commit()
        ctx = multiprocessing.get_context("spawn")
        out, ready, stop = ctx.Queue(), ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_read_loop, args=(url, deferred, pid, out, ready, stop))
        proc.start()
        ready.wait(120)  # the reader is reading
        time.sleep(0.2)
        t0 = time.perf_counter()
        with Session(engine) as session:
            repository.upsert_resources(session, items)
            session.commit()
        t1 = time.perf_counter()
        time.sleep(0.2)
        stop.set()
        times = out.get()
        proc.join()
        done = sum(1 for end, _ in times if t0 <= end <= t1)
        overlapping = [latency for end, latency in times if end >= t0 and end - latency <= t1]
        print(
            f"  a reader process on {label:25}: {done:4} reads done during a {(t1 - t0) * 1e3:.0f} ms write, "
            f"slowest {max(overlapping, default=0) * 1e3:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--postgres", default=PG_DEFAULT)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    settings = Settings(max_bundle_entries=50_000)
    doc = bundle(settings)
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'bench.db'}")
        migrate(engine)
        sqlite_rate = run("SQLite (file, WAL)", engine, doc, settings, args.repeat)
        readers(f"sqlite:///{Path(tmp) / 'bench.db'}", engine, doc, settings)
        engine.dispose()
    met = "met" if sqlite_rate >= TARGET_SQLITE else "NOT met"
    print(f"  target: database part >= {TARGET_SQLITE:,}/s on SQLite (inserts, best): {met}")
    if args.no_postgres:
        return
    schema = f"iectox_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(normalise_url(args.postgres))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        sep = "&" if "?" in args.postgres else "?"
        engine = make_engine(f"{args.postgres}{sep}options=-csearch_path%3D{schema}")
        migrate(engine)
        run("PostgreSQL", engine, doc, settings, args.repeat)
        engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()
