"""The `iectox` command line: evaluate, compare, codebook [check], serve, migrate, synth, demo, worker, poll,
report feedback, cohort grade."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson

from .codebook import CodebookError, load_codebook
from .config.runtime import tune_gc
from .config.settings import Settings
from .fhir.errors import FhirError, operation_outcome
from .observe.logs import configure_logging
from .observe.metrics import serve as serve_metrics
from .observe.traces import configure as configure_traces


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    return Settings(**overrides)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .app.evaluate import evaluate_body, parse_at

    settings = _settings(args)
    codebook = load_codebook(settings.canonical_base, settings.codebook_path)
    tune_gc()
    try:
        body = Path(args.bundle).read_bytes()
        strict = True if args.strict else None
        evaluation = evaluate_body(body, codebook, settings, parse_at(args.at), datetime.now(UTC), strict=strict)
    except FhirError as exc:
        sys.stdout.buffer.write(orjson.dumps(operation_outcome(exc.issues)) + b"\n")
        return 2
    sys.stdout.buffer.write(orjson.dumps(evaluation.bundle()) + b"\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Every scale side by side: current grade, maximum grade since day 0, onset and duration."""
    from .app.evaluate import evaluate_body, parse_at

    settings = _settings(args)
    codebook = load_codebook(settings.canonical_base, settings.codebook_path)
    try:
        evaluation = evaluate_body(
            Path(args.bundle).read_bytes(), codebook, settings, parse_at(args.at), datetime.now(UTC)
        )
    except FhirError as exc:
        sys.stdout.buffer.write(orjson.dumps(operation_outcome(exc.issues)) + b"\n")
        return 2
    current = {r.method: r.grade for r in evaluation.results}

    def grade(g: int | None) -> str:
        return "indet." if g is None else str(g)

    print(f"at {evaluation.at.isoformat()}")
    header = f"{'scale':14} {'current':>8} {'max':>6}  {'onset':25} {'duration':>10}  peak at"
    print(header)
    print("-" * len(header))
    for c in evaluation.courses:
        onset = c.onset.isoformat() if c.onset else "-"
        if c.duration is not None:
            duration = f"{c.duration.total_seconds() / 3600:g} h"
        else:
            duration = "ongoing" if c.onset else "-"
        peak = c.peak_time.isoformat() if c.peak_time and c.peak_grade else "-"
        now = grade(current.get(c.method))
        print(f"{c.method:14} {now:>8} {grade(c.peak_grade):>6}  {onset:25} {duration:>10}  {peak}")
    return 0


def cmd_codebook(args: argparse.Namespace) -> int:
    settings = _settings(args)
    book = load_codebook(settings.canonical_base, settings.codebook_path).to_json()
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(book, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    for name, c in book["concepts"].items():
        codes = ", ".join(f"{x['system'].rsplit('/', 1)[-1]}|{x['code']}" for x in c["codings"])
        print(f"{name:24} {codes}  [{' '.join(c['units'])}]")
    return 0


def cmd_codebook_check(args: argparse.Namespace) -> int:
    """Mapping coverage of a Bundle / NDJSON file or a folder of them; a report, so exit 0."""
    from .app.check import check_path

    settings = _settings(args)
    path = Path(args.path)
    if not path.exists():
        print(f"iectox codebook check: no such file or directory: {path}", file=sys.stderr)
        return 2
    report = check_path(path, load_codebook(settings.canonical_base, settings.codebook_path))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(report.text())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .security import SecurityConfigError, check_bind

    settings = _settings(args)
    host, port = args.host or settings.host, args.port or settings.port
    settings = settings.model_copy(update={"host": host, "port": port})  # the app checks the real bind
    try:
        check_bind(settings, host)  # dev mode (no authentication) only on loopback
        app = create_app(settings)  # checks the settings and applies the migrations, once
    except SecurityConfigError as exc:
        print(f"iectox serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    # uvicorn's access log prints concrete paths (patient ids); the app logs route templates instead.
    run = functools.partial(uvicorn.run, host=host, port=port, log_level="info", proxy_headers=True, access_log=False)
    if args.workers <= 1:
        run(app)
        return 0
    # Several processes: each builds its app from the environment (settings are env-first), with
    # this command's overrides; the schema is already migrated above, so no worker races to it.
    os.environ.update({"IECTOX_HOST": host, "IECTOX_PORT": str(port), "IECTOX_AUTO_MIGRATE": "false"})
    # Metrics of every process in one place, aggregated by whichever process /metrics reaches.
    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="iectox-metrics-")
    if getattr(args, "database_url", None):
        os.environ["IECTOX_DATABASE_URL"] = args.database_url
    try:
        run("service.api.app:create_served_app", factory=True, workers=args.workers)
    finally:
        if made:  # ours: gone with the server
            shutil.rmtree(made, ignore_errors=True)
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    from .api.app import create_app

    # An in-memory database: the spec does not depend on any deployment setting (nor on the
    # auth mode: the bearer scheme is declared either way; dev mode just needs no keys here).
    logging.getLogger("iectox.security").setLevel(logging.ERROR)  # no dev-mode warning for a spec
    app = create_app(Settings(database_url="sqlite://", auth_mode="dev", host="127.0.0.1"))
    sys.stdout.buffer.write(orjson.dumps(app.openapi(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .storage.db import make_engine, migrate

    migrate(make_engine(_settings(args).database_url))
    print("database at the latest revision")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .devtools.synth import generate_cohort, write_cohort, write_ndjson

    settings = _settings(args)
    patients = generate_cohort(args.patients, args.seed, days=args.days, base=settings.canonical_base)
    if args.format == "ndjson":
        paths = write_ndjson(patients, Path(args.out), gzip=args.gzip, max_lines=args.max_lines)
        print(f"{len(patients)} patients, {sum(len(p.bundle['entry']) for p in patients)} resources:")
        print("\n".join(f"{path}" for path in paths))
        return 0
    paths = write_cohort(patients, Path(args.out))
    for p, path in zip(patients, paths, strict=True):
        print(f"{path}  {p.scenario}  {len(p.bundle['entry'])} resources")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .devtools.demo import run_demo

    logging.getLogger("iectox").setLevel(logging.WARNING)  # the table is the demo's output
    return run_demo(
        _settings(args), patients=args.patients, seed=args.seed, days=args.days, port=args.port, serve=args.serve
    )


def cmd_worker(args: argparse.Namespace) -> int:
    import asyncio

    from .config.clock import utc_now
    from .ehr.worker import main as worker_main
    from .storage import outbox
    from .storage.db import make_engine

    configure_traces()  # opt-in by the OTEL_* environment
    settings = _settings(args)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port)  # its deliveries / passes, for Prometheus
    engine = make_engine(settings.database_url)
    try:
        if args.requeue_dead:
            print(f"{outbox.requeue_dead(engine, utc_now())} dead row(s) back to pending")
            return 0
        tune_gc()
        return asyncio.run(worker_main(settings, engine, once=args.once))
    finally:
        engine.dispose()


def cmd_poll(args: argparse.Namespace) -> int:
    import asyncio

    from .codebook import load_codebook
    from .config.clock import utc_now
    from .ehr.poll import run_poll
    from .storage.db import make_engine, migrate

    configure_traces()  # opt-in by the OTEL_* environment
    settings = _settings(args)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port)  # its deliveries / passes, for Prometheus
    engine = make_engine(settings.database_url)
    try:
        if settings.auto_migrate:
            migrate(engine)
        codebook = load_codebook(settings.canonical_base, settings.codebook_path)
        tune_gc()
        return asyncio.run(run_poll(settings, engine, codebook, utc_now, once=args.once))
    finally:
        engine.dispose()


def cmd_report_feedback(args: argparse.Namespace) -> int:
    from sqlmodel import Session

    from .cdshooks.feedback import feedback_report, render
    from .storage import repository
    from .storage.db import make_engine, read_only

    settings = _settings(args)
    try:
        since = datetime.fromisoformat(args.since) if args.since else None
    except ValueError:
        print("--since must be an ISO 8601 time with a timezone (2026-01-01T00:00:00+00:00)", file=sys.stderr)
        return 2
    if since is not None and since.tzinfo is None:
        print("--since needs a timezone (2026-01-01T00:00:00+00:00)", file=sys.stderr)
        return 2
    if since is not None:
        since = since.astimezone(UTC)  # stored times are UTC (SQLite keeps no offset)
    engine = make_engine(settings.database_url)
    try:
        with Session(read_only(engine)) as session:
            cards, feedback = repository.cards_and_feedback(session, since)
    finally:
        engine.dispose()
    print(render(feedback_report(cards, feedback)))
    return 0


def cmd_cohort_grade(args: argparse.Namespace) -> int:
    from .app.evaluate import parse_at
    from .cohort.export import ExportError
    from .cohort.run import grade_cohort

    settings = _settings(args)
    try:
        at = parse_at(args.at)
    except FhirError as exc:
        print(exc.issues[0].diagnostics, file=sys.stderr)
        return 2
    folder, out = Path(args.dir), Path(args.out)
    if not folder.is_dir():
        print(f"{folder} is not a folder (a Bulk FHIR export: Type.ndjson files)", file=sys.stderr)
        return 2
    try:
        summary = grade_cohort(
            folder,
            out,
            settings,
            datetime.now(UTC),
            at=at,
            workers=args.workers,
            scheduler=args.scheduler,
            partition_mb=args.partition_mb,
        )
    except ExportError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    memory = f"; largest worker peak {summary.worker_peak_mib:.0f} MiB" if summary.worker_peak_mib else ""
    print(
        f"{summary.patients} patients, {summary.resources} resources graded in {summary.seconds:.1f} s "
        f"({summary.partitions} partitions{memory}); {summary.warnings} warnings (warnings.csv)"
    )
    print(f"tables, FHIR output and the report: {summary.out}/report.html")
    return 0


def _days(raw: str) -> int:
    from .devtools.synth import MIN_DAYS

    days = int(raw)
    if days < MIN_DAYS:
        raise argparse.ArgumentTypeError(f"at least {MIN_DAYS} days, so every scenario's course is recorded")
    return days


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iectox", description=__doc__)
    parser.add_argument("--database-url", help="overrides IECTOX_DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evaluate", help="grade a Bundle file; prints what POST /fhir/$evaluate returns")
    p.add_argument("bundle")
    p.add_argument("--at", help="evaluation time, ISO 8601 with timezone (default: latest input)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="an input the rules cannot use is an error (exit 2), as with `Prefer: handling=strict`",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="every grading scale side by side: current, maximum, onset, duration")
    p.add_argument("bundle")
    p.add_argument("--at", help="evaluation time, ISO 8601 with timezone (default: latest input)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("codebook", help="print the codebook (codes -> grading concepts); `check PATH`: coverage")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_codebook)
    actions = p.add_subparsers(dest="action", required=False)
    c = actions.add_parser(
        "check",
        help="list the codes the codebook does not map and the rows that would be left out, and why",
        description="Reads a Bundle, an NDJSON file (one resource a line) or a folder of them; prints codes, "
        "reasons and counts only (no ids, no values). Exit 0: it is a report.",
    )
    c.add_argument("path", help="a Bundle (.json), an NDJSON file (.ndjson) or a folder of them")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_codebook_check)

    p = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving requests (PostgreSQL, or SQLite in WAL mode); default 1",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("openapi", help="print the OpenAPI document (openapi/openapi.json)")
    p.set_defaults(func=cmd_openapi)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("worker", help="deliver the write-back outbox to the EHR FHIR server (docs/writeback.md)")
    p.add_argument("--once", action="store_true", help="deliver every due row, then exit (no waiting for backoffs)")
    p.add_argument("--requeue-dead", action="store_true", help="put dead-lettered rows back to pending, then exit")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("poll", help="reconciliation poll: re-read watched patients changed since their checkpoint")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(func=cmd_poll)

    p = sub.add_parser("report", help="reports over what the service stored")
    reports = p.add_subparsers(dest="report", required=True)
    r = reports.add_parser(
        "feedback", help="CDS card acceptance and override rates by card type and indicator, and override reasons"
    )
    r.add_argument("--since", help="only cards and feedback from this time on (ISO 8601 with timezone)")
    r.set_defaults(func=cmd_report_feedback)

    p = sub.add_parser("cohort", help="grade whole cohorts from a Bulk FHIR export (Dask)")
    cohort = p.add_subparsers(dest="cohort", required=True)
    c = cohort.add_parser(
        "grade",
        help="grade every patient of a Bulk FHIR export (NDJSON folder) on every scale; tables, FHIR output, report",
        description="Writes courses.csv/.parquet, daily.parquet, scores.parquet, registry.csv, warnings.csv, "
        "RiskAssessment.ndjson, Provenance.ndjson and report.html to OUT (docs/cohort.md).",
    )
    c.add_argument("dir", help="the export: Patient.ndjson, Observation.ndjson, Observation.2.ndjson, ... (.gz too)")
    c.add_argument("--out", required=True, help="the folder for the outputs")
    c.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    c.add_argument("--scheduler", help="an existing Dask cluster, e.g. tcp://host:8786 (default: a local one)")
    c.add_argument("--at", help="grade every patient at this time (ISO 8601 with timezone; default: its latest input)")
    c.add_argument("--partition-mb", type=float, default=64.0, help="NDJSON per partition: bounds a worker's memory")
    c.set_defaults(func=cmd_cohort_grade)

    p = sub.add_parser("synth", help="write a synthetic cohort as FHIR Bundles, or as a Bulk FHIR export (NDJSON)")
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--days", type=_days, default=10)
    p.add_argument("--out", default="synthetic")
    p.add_argument(
        "--format",
        choices=("bundle", "ndjson"),
        default="bundle",
        help="bundle: one transaction Bundle per patient (default); ndjson: a Bulk FHIR export, Type.ndjson per type",
    )
    p.add_argument("--gzip", action="store_true", help="ndjson: write .ndjson.gz files")
    p.add_argument("--max-lines", type=int, default=100_000, help="ndjson: resources per file before Type.2.ndjson")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "demo", help="start the server on SQLite, post a synthetic cohort, print each course and the worklist URL"
    )
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--days", type=_days, default=8)
    p.add_argument("--port", type=int, default=8000, help="the server's port (another free one when taken)")
    p.add_argument(
        "--serve",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep serving the app after the table until Ctrl-C (default: only on a terminal)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()  # JSON lines without a terminal, readable lines on one (IECTOX_LOG_FORMAT)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CodebookError as exc:
        print(f"codebook error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
