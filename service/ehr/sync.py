"""Bring patients in from the EHR: fetch (or take from a CDS prefetch), store, evaluate, enqueue.

Used by the CDS Hooks services, the subscription notifications (`sync_notification`) and the
reconciliation poll. Idempotent: storing is idempotent on id + meta.versionId, the evaluation
time defaults to the latest input time (so the same data give the same RiskAssessment ids), and
an evaluation whose RiskAssessments are already stored unchanged is neither stored again nor
re-enqueued.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import orjson
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine
from sqlmodel import Session

from ..app.audit import record_access
from ..app.cache import EvaluationCache
from ..app.evaluate import Evaluation
from ..app.store import Checked, evaluate_stored, patient_key, store_evaluation, store_resources
from ..codebook import Codebook
from ..config.settings import Settings
from ..core.concepts import Kind
from ..fhir.errors import FhirError
from ..storage import repository
from ..storage.models import AuditEvent, WatchedPatient
from . import server_config
from .client import FhirClient
from .errors import EhrError
from .notifications import Notification, patient_of, split_reference

log = logging.getLogger("iectox.sync")

# The resource types the service reads for a patient (what FhirClient.patient_data returns).
PATIENT_TYPES = ("Patient", "Observation", "MedicationAdministration", "Condition", "Procedure", "Medication")


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


def _readable(resources: Iterable[Any]) -> list[dict[str, Any]]:
    """The resources of the types the service reads (any other is not an input to grading)."""
    return [r for r in resources if isinstance(r, dict) and r.get("resourceType") in PATIENT_TYPES]


def patient_matcher(patient_id: str, base: str | None) -> Callable[[dict[str, Any]], bool]:
    """Whether a resource is the patient's: the Patient itself, or a subject naming them (relative,
    or absolute on the EHR's `base`). Its references are made once (a hook checks 2,000 resources)."""
    own = f"Patient/{patient_id}"
    refs = {own} if base is None else {own, f"{base.rstrip('/')}/{own}"}

    def names(res: dict[str, Any]) -> bool:
        if res.get("resourceType") == "Patient":
            return res.get("id") == patient_id
        subject = res.get("subject")
        ref = subject.get("reference") if isinstance(subject, dict) else None
        return isinstance(ref, str) and ref in refs

    return names


def _unchanged(session: Session, evaluation: Evaluation) -> bool:
    """Whether every RiskAssessment of the evaluation is stored as computed (one query)."""
    stored = repository.emitted_by_id(session, "RiskAssessment", [ra["id"] for ra in evaluation.assessments])

    def content(ra: dict[str, Any]) -> dict[str, Any]:  # the stored version (meta) is not content
        return {k: v for k, v in ra.items() if k != "meta"}

    for ra in evaluation.assessments:
        found = stored.get(ra["id"])
        if found is None or content(found) != content(ra):
            return False
    return True


def evaluate_patient(
    session: Session,
    patient_id: str,
    codebook: Codebook,
    settings: Settings,
    now: datetime,
    unstored: Iterable[dict[str, Any]] = (),
    cached: Evaluation | None = None,
    *,
    server: str,
    checked: Checked | None = None,
) -> tuple[Evaluation, bool]:
    """Evaluate the stored data; store and enqueue only when something changed.
    Returns the evaluation and whether it was new.

    The evaluation reads the patient back from storage rather than grading what was just fetched:
    the stored record may hold more than this fetch (a CDS prefetch or a poll delta carries only
    part of it; inputs may have been posted to the API) and keeps the newer version of a resource.
    `unstored`: what storage rejected in this read and could not keep (no id), graded leniently
    so each is named as left out (kept rejections are read back by `evaluate_stored`).
    `cached`: the evaluation of these very stored inputs, when known (EvaluationCache).
    """
    evaluation = cached or evaluate_stored(
        session,
        patient_id,
        codebook,
        settings,
        None,
        now,
        store=False,
        fallback_at=now,
        unstored=unstored,
        server=server,
        checked=checked,
    )
    if evaluation.untimed:
        # No timed input yet (a Patient and nothing else): every grade is indeterminate at `now`;
        # shown to the caller, never stored (its time, hence its ids, would change every call).
        return evaluation, False
    if _unchanged(session, evaluation):
        return evaluation, False
    store_evaluation(session, patient_id, evaluation, settings, now, server=server)
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
    server: str,
    base: str | None = None,
    audit: AuditEvent | None = None,
    cache: EvaluationCache | None = None,
    respond: Callable[[Session, Evaluation], None] | None = None,
    received: str | None = None,
) -> tuple[Evaluation | None, bool]:
    """Store what was read from the FHIR server at `base`, evaluate, enqueue and move the poll
    checkpoint, in one transaction. Only a patient the EHR returned is evaluated and watched (an
    unknown id would be re-read every pass). Returns the evaluation (None without the Patient)
    and whether it was new. With a `cache`, a patient whose stored inputs did not change since its
    last evaluation is not graded again, and one whose EHR sent the same bytes as last time (and
    whose stored inputs did not change since) is not stored again either (app/cache.py).
    `respond`: called with the evaluation inside the transaction (a CDS hook decides and records
    its cards there), whether the evaluation is new or cached. `received`: the digest of what the
    EHR sent when the caller made it (raw_received_digest), else made here from the resources."""
    if received is None and cache is not None and target is None:
        received = _received_digest(resources, base)
    key = patient_key(server, patient_id)
    if cache is not None and received is not None:
        again = same_call_again(engine, patient_id, cache, received, audit, respond, settings, server)
        if again is not None:
            return again, False
    with Session(engine, expire_on_commit=False) as session:
        readable = _readable(resources)
        if len(readable) < len(resources):  # counts only: no patient ids or clinical values in the log
            log.info("sync: %d resources of types not read skipped", len(resources) - len(readable))
        fresh = not repository.has_patient(session, patient_id, server=server)
        stored = store_resources(
            session, readable, codebook, site_tz=settings.site_tz(), base=base, server=server, fresh=fresh
        )
        if stored.rejected:
            log.warning("sync: %d resources rejected (invalid for grading; named in evaluations)", stored.rejected)
        # A rejection storage could not keep (no id, or its meta is the problem) is named in this
        # evaluation only; references on the EHR's base count as relative ones.
        theirs = patient_matcher(patient_id, base)
        unkept = [
            res
            for res, out in zip(readable, stored.results, strict=True)
            if out.outcome == "rejected" and not out.kept and theirs(res)
        ]
        evaluation, changed = None, False
        fingerprint = None
        if any(r.get("resourceType") == "Patient" and r.get("id") == patient_id for r in resources):
            if cache is not None and not unkept:
                fingerprint = repository.input_fingerprint(session, patient_id, server=server)
            cached = cache.get(key, fingerprint) if cache is not None and fingerprint else None
            evaluation, changed = evaluate_patient(
                session, patient_id, codebook, settings, now, unkept, cached, server=server, checked=stored.checked
            )
            if target is not None:
                watch(session, target, patient_id, high_water(resources), now)
            if respond is not None:
                respond(session, evaluation)
        if audit is not None:
            record_access(session, audit, settings)
        session.commit()
    if cache is not None and fingerprint and evaluation is not None and not evaluation.untimed:
        cache.put(key, fingerprint, evaluation, received)  # after the commit: it is what is stored
    return evaluation, changed


def same_call_again(
    engine: Engine,
    patient_id: str,
    cache: EvaluationCache,
    received: str,
    audit: AuditEvent | None,
    respond: Callable[[Session, Evaluation], None] | None,
    settings: Settings,
    server: str,
) -> Evaluation | None:
    """The cached evaluation when the EHR sent what it sent last time and the stored inputs kept
    the fingerprint that call left (the access is still audited, `respond` still called); else None."""
    seen = cache.seen(patient_key(server, patient_id), received)
    if seen is None:
        return None
    fingerprint, evaluation = seen
    with Session(engine, expire_on_commit=False) as session:
        if repository.input_fingerprint(session, patient_id, server=server) != fingerprint:
            return None
        if respond is not None:
            respond(session, evaluation)
        if audit is not None:
            record_access(session, audit, settings)
        session.commit()
    return evaluation


def raw_received_digest(text: bytes, base: str | None) -> str:
    """A digest of what the EHR sent as JSON text (a hook's prefetch as received) and from where:
    equal bytes, equal digests; never equal to a `_received_digest` (the text starts otherwise)."""
    return hashlib.sha256(b"raw\n" + orjson.dumps(base) + b"\n" + text).hexdigest()


def _received_digest(resources: list[dict[str, Any]], base: str | None) -> str | None:
    """A digest of what the EHR sent (and from where): equal bytes, equal digests. None when JSON
    cannot hold it (storage rejects such resources, one by one)."""
    try:
        return hashlib.sha256(orjson.dumps([base, resources])).hexdigest()  # SHA-NI: twice blake2b's speed
    except TypeError:
        return None


async def sync_patients(
    client: FhirClient,
    engine: Engine,
    target: str,
    patient_ids: Iterable[str],
    codebook: Codebook,
    settings: Settings,
    clock: Callable[[], datetime],
) -> int:
    """Read, store and evaluate each patient. Returns how many evaluations were new."""
    new = 0
    for pid in sorted(set(patient_ids)):
        resources = await fetch_patient(client, pid, codebook)
        _, changed = await run_in_threadpool(
            partial(store_and_evaluate, target=target, server=settings.namespace(target), base=client.server.base_url),
            engine,
            pid,
            resources,
            codebook,
            settings,
            clock(),
        )
        new += changed
    return new


@dataclass(frozen=True)
class NotificationSync:
    patients: int  # how many patients were read, stored and evaluated
    new: int  # how many of their evaluations were new


async def sync_notification(
    note: Notification, engine: Engine, codebook: Codebook, settings: Settings, clock: Callable[[], datetime]
) -> NotificationSync:
    """An event notification: read its focus resources to find their patients, then sync every
    patient it names from the EHR `subscription_target`. FhirError 503 when that server is not
    configured or cannot be read (the sender retries; the poll catches up)."""
    target = settings.subscription_target
    try:
        server = server_config(settings, target)
    except KeyError:
        raise FhirError.one(503, "transient", f"no EHR server {target!r} configured (IECTOX_EHR_SERVERS)") from None
    patient_ids = set(note.patient_ids)
    try:
        async with FhirClient(server) as client:
            for ref in note.focus:
                focus = split_reference(ref)
                res = await client.read(*focus) if focus else None
                pid = patient_of(res) if res else None
                if pid:
                    patient_ids.add(pid)
            new = await sync_patients(client, engine, target, patient_ids, codebook, settings, clock)
    except (EhrError, ValueError) as exc:
        log.warning("notification: EHR read failed (%s)", type(exc).__name__)
        raise FhirError.one(503, "transient", "the EHR could not be read; retry later") from None
    log.info("notification: %d events, %d patients, %d new evaluations", note.events, len(patient_ids), new)
    return NotificationSync(len(patient_ids), new)


def watch(session: Session, target: str, patient_id: str, checkpoint: str | None, now: datetime) -> None:
    """Add the patient to the reconciliation poll; move its checkpoint forward, never back."""
    if repository.add_watched(session, target, patient_id, checkpoint or "", now):
        return
    row = session.get(WatchedPatient, (target, patient_id))
    if row is None:
        return
    if checkpoint and (not row.checkpoint or instant_key(checkpoint) > instant_key(row.checkpoint)):
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
