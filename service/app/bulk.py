"""FHIR Bulk Data export of stored results (https://hl7.org/fhir/uv/bulkdata/export.html), for
registries that pull from the running service: the asynchronous kick-off, the job, the manifest.

Exportable types: RiskAssessment and Provenance (what iectox produces). A job writes NDJSON files
of at most `FILE_MAX` resources or about `FILE_MAX_BYTES`, kept in the database (so every replica
serves them), reading the stored results a batch at a time. `_since` holds the versions stored at
or after that instant. Only the client that started a job sees it. A job the process did not
finish (a restart) reports an error once `max_minutes` have passed; the client starts a new one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, delete
from sqlmodel import Session, col, select

from ..fhir.errors import FhirError
from ..storage import repository
from ..storage.db import read_only
from ..storage.models import ExportFile, ExportJob, utc

log = logging.getLogger("iectox.export")

EXPORT_TYPES = ("RiskAssessment", "Provenance")
FILE_MAX = 50_000  # resources per NDJSON file ...
FILE_MAX_BYTES = 16 * 2**20  # ... and bytes (a file is kept, and served, whole)
# The manifest's transactionTime is this much before the kick-off: an evaluation that began before
# it and committed after the export read its rows is in the next `_since=transactionTime` export
# (a repeat is harmless: the same id and version; a gap would lose a result).
OVERLAP = timedelta(minutes=5)
IN_PROGRESS, COMPLETE, ERROR = "in-progress", "complete", "error"


def requested_types(raw: str | None) -> tuple[str, ...]:
    """`_type`: a comma-separated list of exportable types (default: all); 400 naming any other."""
    if raw is None or not raw.strip():
        return EXPORT_TYPES
    types = tuple(dict.fromkeys(t.strip() for t in raw.split(",") if t.strip()))
    unknown = [t for t in types if t not in EXPORT_TYPES]
    if unknown or not types:
        raise FhirError.one(
            400,
            "not-supported",
            f"_type: {', '.join(unknown) or 'empty'}; this server exports {', '.join(EXPORT_TYPES)}",
            "_type",
        )
    return types


def parse_since(raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise FhirError.one(400, "value", "_since must be a FHIR instant (with a timezone)", "_since") from None
    if t.tzinfo is None:
        raise FhirError.one(400, "value", "_since needs a timezone (2026-01-01T00:00:00Z)", "_since")
    return t


def start_export(
    session: Session,
    types: tuple[str, ...],
    since: datetime | None,
    request: str,
    actor: str,
    now: datetime,
    *,
    server: str,
) -> str:
    """Record a new job (in the caller's transaction); returns its id."""
    job_id = str(uuid.uuid4())
    session.add(
        ExportJob(
            id=job_id,
            status=IN_PROGRESS,
            types=",".join(types),
            since=since,
            request=request[:2048],
            actor=actor[:256],
            server=server,
            created=now,
        )
    )
    return job_id


def run_export(engine: Engine, job_id: str, clock: Callable[[], datetime]) -> None:
    """Write the job's files, then mark it complete (or error, with the error's class only). The
    stored results are read in a read-only session (on SQLite it holds no write lock: evaluations
    go on) and each file is written in its own short transaction."""
    try:
        with Session(read_only(engine)) as reader:
            job = reader.get(ExportJob, job_id)
            if job is None:  # deleted before it ran
                return
            types, since = job.types.split(","), job.since
            for rtype in types:
                for name, count, body in _files(reader, rtype, since, job.server):
                    with Session(engine) as writer:
                        writer.add(ExportFile(job_id=job_id, name=name, resource_type=rtype, count=count, body=body))
                        writer.commit()
        _finish(engine, job_id, COMPLETE, "", clock())
    except Exception as exc:  # recorded on the job (its class only); the client reads it
        log.error("export failed: %s", type(exc).__name__)
        _finish(engine, job_id, ERROR, type(exc).__name__, clock())


def _finish(engine: Engine, job_id: str, status: str, error: str, now: datetime) -> None:
    with Session(engine) as session:
        job = session.get(ExportJob, job_id)
        if job is None:  # cancelled meanwhile: its files go too
            session.exec(delete(ExportFile).where(col(ExportFile.job_id) == job_id))
        else:
            if status == ERROR:
                session.exec(delete(ExportFile).where(col(ExportFile.job_id) == job_id))
            job.status, job.error, job.finished = status, error, now
            session.add(job)
        session.commit()


def _files(session: Session, rtype: str, since: datetime | None, server: str) -> Iterator[tuple[str, int, bytes]]:
    """(name, count, NDJSON) of each file of one type: at most FILE_MAX resources and about
    FILE_MAX_BYTES each; no empty file (the manifest lists only files with resources)."""
    part, lines, count = 1, bytearray(), 0
    for batch in repository.emitted_for_export(session, rtype, since, server=server):
        for res in batch:
            lines += orjson.dumps(res) + b"\n"
            count += 1
            if count == FILE_MAX or len(lines) >= FILE_MAX_BYTES:
                yield f"{rtype}-{part}.ndjson", count, bytes(lines)
                part, lines, count = part + 1, bytearray(), 0
    if count:
        yield f"{rtype}-{part}.ndjson", count, bytes(lines)


@dataclass(frozen=True)
class Status:
    status: str
    manifest: dict[str, Any] | None = None
    error: str = ""


def owned_job(session: Session, job_id: str, actor: str) -> ExportJob:
    """The job, when the caller started it (404 otherwise: another client's job is not revealed)."""
    job = session.get(ExportJob, job_id)
    if job is None or job.actor != actor[:256]:
        raise FhirError.one(404, "not-found", "no such export job", "job")
    return job


def export_status(session: Session, job: ExportJob, base_url: str, now: datetime, max_minutes: float) -> Status:
    """The job's state, and its manifest once complete."""
    job_id = job.id
    if job.status == IN_PROGRESS and utc(now) - utc(job.created) > timedelta(minutes=max_minutes):
        return Status(ERROR, error="the export did not finish (the server may have restarted): start a new one")
    if job.status != COMPLETE:
        return Status(job.status, error=job.error)
    files = session.exec(
        select(ExportFile.name, ExportFile.resource_type, ExportFile.count)
        .where(ExportFile.job_id == job_id)
        .order_by(col(ExportFile.name))
    ).all()
    manifest = {
        "transactionTime": (utc(job.created) - OVERLAP).isoformat(),
        "request": job.request,
        "requiresAccessToken": True,
        "output": [
            {"type": rtype, "url": f"{base_url}/$export-file/{job_id}/{name}", "count": count}
            for name, rtype, count in files
        ],
        "error": [],
    }
    return Status(COMPLETE, manifest)


def export_file(session: Session, job: ExportJob, name: str) -> ExportFile:
    found = session.get(ExportFile, (job.id, name))
    if found is None:
        raise FhirError.one(404, "not-found", "no such export file", "file")
    return found


def delete_export(session: Session, job: ExportJob) -> None:
    """Cancel or clean up a job: the job and its files are deleted."""
    session.exec(delete(ExportFile).where(col(ExportFile.job_id) == job.id))
    session.delete(job)
