"""FHIR Bulk Data export of stored results (https://hl7.org/fhir/uv/bulkdata/export.html), for
registries that pull from the running service: the asynchronous kick-off, the job, the manifest.

Exportable types: RiskAssessment and Provenance (what iectox produces). A job writes one NDJSON
file per type and per `FILE_MAX` resources, kept in the database (so every replica serves them),
and reads the stored results a batch at a time. `_since` holds the versions stored at or after
that instant. A job the process did not finish (a restart) reports an error once
`max_minutes` have passed; the client starts a new one.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, delete
from sqlmodel import Session, col, select

from ..fhir.errors import FhirError
from ..storage import repository
from ..storage.models import ExportFile, ExportJob, utc

log = logging.getLogger("iectox.export")

EXPORT_TYPES = ("RiskAssessment", "Provenance")
FILE_MAX = 50_000  # resources per NDJSON file
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
    session: Session, types: tuple[str, ...], since: datetime | None, request: str, actor: str, now: datetime
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
            created=now,
        )
    )
    return job_id


def run_export(engine: Engine, job_id: str, now: datetime) -> None:
    """Write the job's files, then mark it complete (or error, with the error's class only)."""
    try:
        with Session(engine) as session:
            job = session.get(ExportJob, job_id)
            if job is None:  # deleted before it ran
                return
            for rtype in job.types.split(","):
                _write_files(session, job_id, rtype, job.since)
            job.status, job.finished = COMPLETE, now
            session.add(job)
            session.commit()
    except Exception as exc:  # recorded on the job (its class only); the client reads it
        log.error("export failed: %s", type(exc).__name__)
        with Session(engine) as session:
            job = session.get(ExportJob, job_id)
            if job is not None:
                session.exec(delete(ExportFile).where(col(ExportFile.job_id) == job_id))
                job.status, job.error, job.finished = ERROR, type(exc).__name__, now
                session.add(job)
                session.commit()


def _write_files(session: Session, job_id: str, rtype: str, since: datetime | None) -> None:
    part, lines, count = 1, bytearray(), 0
    for batch in repository.emitted_for_export(session, rtype, since):
        for res in batch:
            lines += orjson.dumps(res) + b"\n"
            count += 1
            if count == FILE_MAX:
                session.add(
                    ExportFile(
                        job_id=job_id,
                        name=f"{rtype}-{part}.ndjson",
                        resource_type=rtype,
                        count=count,
                        body=bytes(lines),
                    )
                )
                session.flush()
                part, lines, count = part + 1, bytearray(), 0
    if count:  # the manifest lists only files with resources (Bulk Data: no empty files)
        session.add(
            ExportFile(
                job_id=job_id, name=f"{rtype}-{part}.ndjson", resource_type=rtype, count=count, body=bytes(lines)
            )
        )


@dataclass(frozen=True)
class Status:
    status: str
    manifest: dict[str, Any] | None = None
    error: str = ""


def export_status(session: Session, job_id: str, base_url: str, now: datetime, max_minutes: float) -> Status:
    """The job's state, and its manifest once complete; 404 for an unknown job."""
    job = session.get(ExportJob, job_id)
    if job is None:
        raise FhirError.one(404, "not-found", "no such export job", "job")
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
        "transactionTime": utc(job.created).isoformat(),
        "request": job.request,
        "requiresAccessToken": True,
        "output": [
            {"type": rtype, "url": f"{base_url}/$export-file/{job_id}/{name}", "count": count}
            for name, rtype, count in files
        ],
        "error": [],
    }
    return Status(COMPLETE, manifest)


def export_file(session: Session, job_id: str, name: str) -> ExportFile:
    found = session.get(ExportFile, (job_id, name))
    if found is None:
        raise FhirError.one(404, "not-found", "no such export file", "file")
    return found


def delete_export(session: Session, job_id: str) -> None:
    """Cancel or clean up a job: the job and its files are deleted (404 for an unknown job)."""
    job = session.get(ExportJob, job_id)
    if job is None:
        raise FhirError.one(404, "not-found", "no such export job", "job")
    session.exec(delete(ExportFile).where(col(ExportFile.job_id) == job_id))
    session.delete(job)
