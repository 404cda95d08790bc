"""Bring one patient in from the EHR: fetch (or take from a CDS prefetch), store, evaluate, enqueue.

Used by the CDS Hooks services, the subscription notification endpoint and the reconciliation
poll. Idempotent: storing is idempotent on id + meta.versionId, the evaluation time defaults to
the latest input time (so the same data give the same RiskAssessment ids), and an evaluation
whose RiskAssessments are already stored unchanged is neither stored again nor re-enqueued.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from ..app.evaluate import Evaluation
from ..app.store import evaluate_stored, store_bundle, store_evaluation
from ..codebook import Codebook
from ..config.settings import Settings
from ..core.concepts import Kind
from ..fhir.errors import FhirError
from ..storage import repository
from ..storage.models import AuditEvent, WatchedPatient
from .client import FhirClient

log = logging.getLogger("iectox.sync")

# The resource types the service reads for a patient (what FhirClient.patient_data returns).
PATIENT_TYPES = ("Patient", "Observation", "MedicationAdministration", "Condition", "Procedure")


# Blood pressure panels: systolic and mean pressure are often components of a panel, and a
# `code` search matches Observation.code only (not component.code), so the panels are asked for too.
BP_PANEL_CODES = ("http://loinc.org|85354-9", "http://loinc.org|55284-4", "http://loinc.org|35094-2")


def observation_codes(codebook: Codebook) -> list[str]:
    """Every Observation code the codebook maps, and the blood pressure panel codes, as
    `system|code` search tokens."""
    tokens = list(BP_PANEL_CODES)
    for concept in codebook.concepts.values():
        if concept.kind in (Kind.QUANTITY, Kind.SCORE, Kind.CODED):
            tokens += [f"{system}|{code}" for system, code in concept.codings]
    return sorted(set(tokens))


async def fetch_patient(client: FhirClient, patient_id: str, codebook: Codebook) -> list[dict[str, Any]]:
    return await client.patient_data(patient_id, observation_codes=observation_codes(codebook))


def _batch(resources: Iterable[dict[str, Any]]) -> dict[str, Any]:
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources
        if isinstance(r, dict) and r.get("resourceType") in PATIENT_TYPES and isinstance(r.get("id"), str)
    ]
    return {"resourceType": "Bundle", "type": "batch", "entry": entries}


def store_resources(session: Session, resources: list[dict[str, Any]], codebook: Codebook, settings: Settings) -> int:
    """Store what was read (a batch: an invalid resource is skipped, never the others).
    Returns how many entries were rejected."""
    doc = _batch(resources)
    if not doc["entry"]:
        return 0
    out = store_bundle(session, doc, codebook, max(settings.max_bundle_entries, len(doc["entry"])))
    rejected = sum(1 for e in out["entry"] if not str(e["response"]["status"]).startswith("2"))
    if rejected:
        log.warning("sync: %d resources rejected (invalid for grading)", rejected)
    return rejected


def _unchanged(session: Session, evaluation: Evaluation) -> bool:
    for ra in evaluation.assessments:
        stored = repository.get_emitted(session, "RiskAssessment", ra["id"])
        if stored is None or {k: v for k, v in stored.items() if k != "meta"} != ra:
            return False
    return True


def evaluate_patient(
    session: Session, patient_id: str, codebook: Codebook, settings: Settings, now: datetime
) -> tuple[Evaluation, bool]:
    """Evaluate the stored data; store and enqueue only when something changed.
    Returns the evaluation and whether it was new."""
    try:
        evaluation = evaluate_stored(session, patient_id, codebook, settings, None, now, store=False)
    except FhirError as exc:
        if exc.status != 422 or not any(i.expression == "at" for i in exc.issues):
            raise
        # No timed input yet (a Patient and nothing else): every grade is indeterminate at `now`;
        # shown to the caller, never stored (its time, hence its ids, would change every call).
        return evaluate_stored(session, patient_id, codebook, settings, now, now, store=False), False
    if _unchanged(session, evaluation):
        return evaluation, False
    store_evaluation(session, patient_id, evaluation, settings, now)
    return evaluation, True


def store_and_evaluate(
    engine: Engine,
    patient_id: str,
    resources: list[dict[str, Any]],
    codebook: Codebook,
    settings: Settings,
    now: datetime,
    *,
    target: str | None,
    audit: AuditEvent | None = None,
) -> tuple[Evaluation | None, bool]:
    """Store what was read, evaluate, enqueue and move the poll checkpoint, in one transaction.
    Only a patient the EHR returned is evaluated and watched (an unknown id would be re-read
    every pass). Returns the evaluation (None without the Patient) and whether it was new."""
    with Session(engine, expire_on_commit=False) as session:
        store_resources(session, resources, codebook, settings)
        evaluation, changed = None, False
        if any(r.get("resourceType") == "Patient" and r.get("id") == patient_id for r in resources):
            evaluation, changed = evaluate_patient(session, patient_id, codebook, settings, now)
            if target is not None:
                watch(session, target, patient_id, high_water(resources), now)
        if audit is not None:
            repository.add_audit_event(session, audit)
        session.commit()
    return evaluation, changed


def watch(session: Session, target: str, patient_id: str, checkpoint: str | None, now: datetime) -> None:
    """Add the patient to the reconciliation poll; move its checkpoint forward, never back."""
    row = session.get(WatchedPatient, (target, patient_id))
    if row is None:
        session.add(WatchedPatient(target=target, patient_id=patient_id, checkpoint=checkpoint or "", updated=now))
    elif checkpoint and (not row.checkpoint or instant_key(checkpoint) > instant_key(row.checkpoint)):
        row.checkpoint, row.updated = checkpoint, now
        session.add(row)


def high_water(resources: Iterable[dict[str, Any]]) -> str | None:
    """The latest meta.lastUpdated among the resources (the poll checkpoint)."""
    marks = [
        r["meta"]["lastUpdated"]
        for r in resources
        if isinstance(r.get("meta"), dict) and isinstance(r["meta"].get("lastUpdated"), str)
    ]
    return max(marks, key=instant_key) if marks else None


def instant_key(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
