"""All queries live here. Callers pass a Session; they never commit (the request does).

Storage parses no FHIR: the application layer hands it the index fields (patient, version,
method, code, occurrence) next to the resource it stores verbatim.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import delete, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from .models import AuditEvent, EmittedResource, RejectedInput, SeenToken, StoredResource


@dataclass(frozen=True)
class WriteOutcome:
    resource_type: str
    id: str
    version_id: int
    status: str  # "201 Created" | "200 OK"
    changed: bool = True  # False when the stored version was kept (same or newer)


def read_resource(session: Session, rtype: str, rid: str) -> dict[str, Any] | None:
    """A stored input resource as stored, with the server's version in meta.versionId."""
    row = session.get(StoredResource, (rtype, rid))
    if row is None:
        return None
    res: dict[str, Any] = orjson.loads(row.body)
    res["meta"] = {**(res.get("meta") or {}), "versionId": str(row.version_id)}
    return res


def upsert_resource(
    session: Session, res: dict[str, Any], patient_id: str | None, supersedes: Callable[[str, str], bool]
) -> WriteOutcome:
    """Idempotent on id + version: the same version twice, or an older one, changes nothing.

    `supersedes(stored versionId, stored lastUpdated)` tells whether `res` is newer than the
    stored version (the caller orders FHIR versions); a resource without either replaces the
    stored one when its content differs.
    """
    rtype, rid = res["resourceType"], res["id"]
    meta = res.get("meta") or {}
    source_version = str(meta.get("versionId") or "")
    source_updated = str(meta.get("lastUpdated") or "")
    body = orjson.dumps(res)
    row = session.get(StoredResource, (rtype, rid))
    if row is None:
        session.add(
            StoredResource(
                resource_type=rtype,
                id=rid,
                patient_id=patient_id,
                version_id=1,
                source_version=source_version,
                source_last_updated=source_updated,
                body=body,
            )
        )
        return WriteOutcome(rtype, rid, 1, "201 Created")
    versioned = bool(source_version or source_updated)
    if row.body == body or (versioned and not supersedes(row.source_version, row.source_last_updated)):
        return WriteOutcome(rtype, rid, row.version_id, "200 OK", changed=False)
    row.body, row.patient_id = body, patient_id
    row.source_version, row.source_last_updated = source_version, source_updated
    row.version_id += 1
    session.add(row)
    return WriteOutcome(rtype, rid, row.version_id, "200 OK")


def patient_inputs(session: Session, patient_id: str) -> list[dict[str, Any]]:
    """The stored Patient and everything that references it (plus referenced Medications)."""
    rows = session.exec(
        select(StoredResource).where(
            (col(StoredResource.patient_id) == patient_id)
            | ((col(StoredResource.resource_type) == "Patient") & (col(StoredResource.id) == patient_id))
        )
    ).all()
    resources = [orjson.loads(r.body) for r in rows]
    med_ids = {
        ref.split("/", 1)[1]
        for r in resources
        if r.get("resourceType") == "MedicationAdministration"
        and isinstance(ref := (r.get("medicationReference") or {}).get("reference"), str)
        and ref.startswith("Medication/")
    }
    if med_ids:
        meds = session.exec(
            select(StoredResource).where(
                (col(StoredResource.resource_type) == "Medication") & col(StoredResource.id).in_(med_ids)
            )
        ).all()
        resources += [orjson.loads(m.body) for m in meds]
    return resources


def stored_version(session: Session, rtype: str, rid: str) -> tuple[str, str] | None:
    """(meta.versionId, meta.lastUpdated) as sent, of the stored input resource; None when absent."""
    row = session.get(StoredResource, (rtype, rid))
    return None if row is None else (row.source_version, row.source_last_updated)


def save_rejected(session: Session, res: dict[str, Any], patient_id: str) -> None:
    """Keep a rejected EHR resource (replacing an earlier rejected version of it)."""
    meta = res.get("meta") or {}
    row = session.get(RejectedInput, (res["resourceType"], res["id"]))
    if row is None:
        row = RejectedInput(resource_type=res["resourceType"], id=res["id"], patient_id=patient_id, body=b"")
    row.patient_id, row.body = patient_id, orjson.dumps(res)
    row.source_version = str(meta.get("versionId") or "")
    row.source_last_updated = str(meta.get("lastUpdated") or "")
    session.add(row)


def any_rejected(session: Session) -> bool:
    return session.exec(select(RejectedInput.id).limit(1)).first() is not None


def rejected_version(session: Session, rtype: str, rid: str) -> tuple[str, str] | None:
    row = session.get(RejectedInput, (rtype, rid))
    return None if row is None else (row.source_version, row.source_last_updated)


def clear_rejected(session: Session, rtype: str, rid: str) -> None:
    session.execute(
        delete(RejectedInput).where((col(RejectedInput.resource_type) == rtype) & (col(RejectedInput.id) == rid))
    )


def rejected_inputs(session: Session, patient_id: str) -> list[dict[str, Any]]:
    """The rejected EHR resources of one patient, as read."""
    rows = session.exec(select(RejectedInput).where(col(RejectedInput.patient_id) == patient_id)).all()
    return [orjson.loads(r.body) for r in rows]


@dataclass(frozen=True)
class Emitted:
    """An emitted resource with its index fields (method and code: RiskAssessments only)."""

    resource: dict[str, Any]
    occurrence: datetime
    method: str | None = None
    code: str | None = None


def save_emitted(session: Session, patient_id: str, emitted: list[Emitted]) -> None:
    """Upsert RiskAssessments and their Provenance by their deterministic ids (never duplicates)."""
    for item in emitted:
        res = item.resource
        rtype, rid = res["resourceType"], res["id"]
        row = session.get(EmittedResource, (rtype, rid))
        if row is None:
            row = EmittedResource(
                resource_type=rtype,
                id=rid,
                patient_id=patient_id,
                method=item.method,
                code=item.code,
                occurrence=item.occurrence,
                version_id=1,
                body=b"",
            )
        else:
            row.version_id += 1
        res.setdefault("meta", {})["versionId"] = str(row.version_id)
        row.body = orjson.dumps(res)
        session.add(row)


def get_emitted(session: Session, rtype: str, rid: str) -> dict[str, Any] | None:
    row = session.get(EmittedResource, (rtype, rid))
    return None if row is None else orjson.loads(row.body)


def emitted_by_id(session: Session, rtype: str, ids: Collection[str]) -> dict[str, dict[str, Any]]:
    """The stored emitted resources of type `rtype` among `ids` (one query), by id."""
    if not ids:
        return {}
    rows = session.exec(
        select(EmittedResource).where(
            (col(EmittedResource.resource_type) == rtype) & col(EmittedResource.id).in_(list(ids))
        )
    ).all()
    return {row.id: orjson.loads(row.body) for row in rows}


def search_assessments(
    session: Session, patient_id: str | None, method: str | None, newest_first: bool, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    query = select(EmittedResource).where(col(EmittedResource.resource_type) == "RiskAssessment")
    if patient_id is not None:
        query = query.where(col(EmittedResource.patient_id) == patient_id)
    if method is not None:
        query = query.where(col(EmittedResource.method) == method)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    order = col(EmittedResource.occurrence).desc() if newest_first else col(EmittedResource.occurrence).asc()
    rows = session.exec(query.order_by(order, col(EmittedResource.id)).offset(offset).limit(limit)).all()
    return int(total), [orjson.loads(r.body) for r in rows]


def new_id() -> str:
    return str(uuid.uuid4())


# --- Inbound security: audit log and seen JWT ids ---------------------------------------------


def add_audit_event(session: Session, event: AuditEvent) -> None:
    """Add an audit row; when it names a stored resource but no patient, the resource's patient."""
    if event.patient_id is None and event.resource_type and event.resource_id:
        if event.resource_type == "Patient":
            event.patient_id = event.resource_id
        else:
            row: StoredResource | EmittedResource | None = session.get(
                StoredResource, (event.resource_type, event.resource_id)
            ) or session.get(EmittedResource, (event.resource_type, event.resource_id))
            event.patient_id = row.patient_id if row is not None else None
    session.add(event)


def audit_events(session: Session, patient_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
    """The newest audit rows first, optionally those of one patient."""
    query = select(AuditEvent)
    if patient_id is not None:
        query = query.where(col(AuditEvent.patient_id) == patient_id)
    return list(session.exec(query.order_by(col(AuditEvent.id).desc()).limit(limit)).all())


def remember_token(session: Session, key: str, expires: datetime, now: datetime) -> bool:
    """Record a JWT id until `expires`; False if it is already recorded (a replay).

    Rows past their expiry are deleted first. Concurrent requests with the same key conflict
    on the primary key: one of them gets False.
    """
    session.exec(delete(SeenToken).where(col(SeenToken.expires) < now))
    if session.get(SeenToken, key) is not None:
        return False
    try:
        with session.begin_nested():
            session.add(SeenToken(key=key, expires=expires))
    except IntegrityError:
        return False
    return True
