"""Storing input resources: transaction / batch Bundles, single-resource create/update, and
lists of resources read from an EHR.

A transaction is all-or-nothing: every entry is checked before anything is written, and the
request's database transaction commits only when the route returns. Every path checks each
resource the same way (`_check`) and stores the usable ones with set-based, versioned upserts
(`_store`: storage compares versions in the statement, from the index fields computed here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, tzinfo
from typing import Any, Literal

import orjson
from sqlmodel import Session

from ..codebook import Codebook
from ..config.settings import Settings
from ..fhir.emit import index_fields
from ..fhir.errors import FhirError, Issue, operation_outcome
from ..fhir.ingest import (
    FHIR_ID,
    CheckedObservation,
    Entry,
    check_for_storage,
    is_resource_type,
    meta_issues,
    version_key,
    version_key_of,
)
from ..fhir.writeback import Mode, transaction_bundles
from ..observe.logs import current_request_id
from ..storage import outbox, repository
from .evaluate import Evaluation, evaluate_entries

WRITE_METHODS = ("POST", "PUT")

Outcome = Literal["stored", "unchanged", "rejected"]


@dataclass(frozen=True)
class ResourceResult:
    """What storing one resource did: `stored` (created or a new version), `unchanged` (the
    stored version is the same or newer), or `rejected` (with the FHIRPath issues; not written)."""

    resource_type: str
    id: str
    outcome: Outcome
    issues: tuple[Issue, ...] = ()
    write: repository.WriteOutcome | None = None  # None when rejected
    # Rejected and accounted for (store_resources): kept to be named by every later evaluation,
    # or older than the stored version, which stands. False: only this read can name it (no id).
    kept: bool = False


@dataclass(frozen=True)
class StoreResult:
    results: tuple[ResourceResult, ...] = ()
    # What this call checked and stored, by (type, id, this service's version): the resource and,
    # for an Observation, what its check normalised (Entry.checked). An evaluation in the same transaction
    # reading that very row takes them instead of reading, parsing and normalising it again.
    checked: Checked = field(default_factory=dict)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def rejected(self) -> int:
        return self.count("rejected")


Checked = dict[tuple[str, str, int], tuple[dict[str, Any], CheckedObservation | None]]


@dataclass
class _Checked:
    entry: Entry
    patient_id: str | None
    issues: list[Issue]
    body: bytes | None  # the resource as storage keeps it (made once: checked, then stored)
    checked: CheckedObservation | None  # an Observation's, when its check had no issue and ignored nothing


def _check(entry: Entry, codebook: Codebook, site_tz: tzinfo | None) -> _Checked:
    body = _body(entry.resource) if isinstance(entry.resource, dict) else None
    checked: list[CheckedObservation] = []
    patient_id, issues = check_for_storage(entry, codebook, site_tz, body, checked)
    return _Checked(entry, patient_id, issues, body, checked[0] if checked else None)


def patient_key(server: str, patient_id: str) -> str:
    """A patient's key in the per-process caches: two servers' Patient/123 are two patients."""
    return f"{server}\x00{patient_id}"


def new_version(
    res: dict[str, Any], patient_id: str | None, server: str, body: bytes | None = None
) -> repository.NewVersion:
    """A checked resource with the index fields storage needs (the version order as numbers);
    `body`: its JSON when already made."""
    meta = res.get("meta") or {}
    source_version, updated = str(meta.get("versionId") or ""), meta.get("lastUpdated")
    number, _, instant = version_key_of(source_version, updated)
    return repository.NewVersion(
        server,
        res["resourceType"],
        res["id"],
        patient_id,
        source_version,
        str(updated or ""),
        number,
        instant,
        body if body is not None else orjson.dumps(res),
    )


def _store(session: Session, checked: list[_Checked], server: str) -> list[ResourceResult]:
    """Upsert the checked resources without issues (set-based); one result per resource, in
    order. A resource with issues is rejected, not written."""
    usable = [c for c in checked if not c.issues]
    versions = [new_version(c.entry.resource, c.patient_id, server, c.body) for c in usable]
    writes = iter(repository.upsert_resources(session, versions))
    results = []
    for c in checked:
        if c.issues:
            res = c.entry.resource
            rtype, rid = str(res.get("resourceType") or ""), str(res.get("id") or "")
            results.append(ResourceResult(rtype, rid, "rejected", tuple(c.issues)))
        else:
            out = next(writes)
            results.append(
                ResourceResult(out.resource_type, out.id, "stored" if out.changed else "unchanged", write=out)
            )
    return results


def _rewrite(node: Any, rewrite: Callable[[str], str]) -> Any:
    """Every `reference` string of a resource passed through `rewrite`, recursively."""
    if isinstance(node, dict):
        return {
            k: rewrite(v) if k == "reference" and isinstance(v, str) else _rewrite(v, rewrite) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite(v, rewrite) for v in node]
    return node


def local_references(res: dict[str, Any], base: str) -> dict[str, Any]:
    """References on the server's own `base` (https://ehr/fhir/Medication/1) made relative
    (Medication/1): FHIR deems them the same, and storage joins by Type/id."""
    prefix = base.rstrip("/") + "/"

    def relative(ref: str) -> str:
        rest = ref[len(prefix) :] if ref.startswith(prefix) else None
        return rest if rest is not None and rest.count("/") == 1 else ref

    return _rewrite(res, relative)


def _plan(doc: dict[str, Any], max_entries: int) -> list[Entry]:
    raw = doc.get("entry") or []
    if not isinstance(raw, list):
        raise FhirError.one(400, "structure", "Bundle.entry must be an array", "Bundle.entry")
    if len(raw) > max_entries:
        raise FhirError.one(413, "too-long", f"{len(raw)} entries; the limit is {max_entries}", "Bundle.entry")
    writes: list[Entry] = []
    refs: dict[str, str] = {}
    issues: list[Issue] = []
    for i, e in enumerate(raw):
        path = f"Bundle.entry[{i}]"
        res = e.get("resource") if isinstance(e, dict) else None
        req = e.get("request") if isinstance(e, dict) else None
        if not isinstance(res, dict) or not isinstance(req, dict):
            issues.append(Issue("required", "a transaction/batch entry needs resource and request", path))
            continue
        method, url = req.get("method"), str(req.get("url") or "")
        rtype = res.get("resourceType")
        if method not in WRITE_METHODS:
            issues.append(
                Issue("not-supported", f"request.method {method!r} (supported: POST, PUT)", f"{path}.request.method")
            )
            continue
        if not isinstance(rtype, str) or not is_resource_type(rtype):
            issues.append(Issue("not-supported", f"unknown resourceType {rtype!r}", f"{path}.resource.resourceType"))
            continue
        if method == "PUT":
            parts = url.split("?")[0].strip("/").split("/")
            if len(parts) != 2 or parts[0] != rtype:
                issues.append(Issue("value", f"PUT url must be {rtype}/<id>", f"{path}.request.url"))
                continue
            if res.get("id") not in (None, parts[1]):
                issues.append(Issue("value", "resource.id differs from the id in request.url", f"{path}.resource.id"))
                continue
            rid = parts[1]
        else:
            rid = res.get("id") or repository.new_id()
        res = {**res, "id": rid}
        if isinstance(e.get("fullUrl"), str):
            refs[e["fullUrl"]] = f"{rtype}/{rid}"
        writes.append(Entry(res, f"{path}.resource", e.get("fullUrl")))
    if issues:
        raise FhirError(422, issues)
    if refs:
        targets = {url.encode() for url in refs}
        for w in writes:
            if _may_refer(w.resource, targets):
                w.resource = _rewrite(w.resource, lambda ref: refs.get(ref, ref))
    return writes


_REFERENCE = re.compile(rb'"reference":"([^"\\]*)"')


def _may_refer(res: dict[str, Any], targets: set[bytes]) -> bool:
    """Whether `res` may hold a reference in `targets`: a scan of its JSON (C speed), as most
    entries of a Bundle refer to no other entry by its fullUrl. An escape in it: walk it anyway."""
    body = orjson.dumps(res)
    return b"\\" in body or any(ref in targets for ref in _REFERENCE.findall(body))


def store_bundle(
    session: Session, doc: dict[str, Any], codebook: Codebook, settings: Settings, *, server: str
) -> dict[str, Any]:
    """The HTTP API's `POST /fhir`: a transaction or batch Bundle in, its FHIR response Bundle out,
    stored under `server` (the caller's EHR, or "")."""
    btype = doc.get("type")
    if btype not in ("transaction", "batch"):
        raise FhirError.one(422, "value", "POST /fhir takes a transaction or batch Bundle", "Bundle.type")
    site_tz = settings.site_tz()
    checked = [_check(entry, codebook, site_tz) for entry in _plan(doc, settings.max_bundle_entries)]
    if btype == "transaction":
        problems = [i for c in checked for i in c.issues]
        if problems:
            raise FhirError(422, problems[:50])
    written = _store(session, checked, server)
    if repository.any_rejected(session):
        _clear_superseded(session, [c.entry.resource for c, w in zip(checked, written, strict=True) if w.write], server)
    entries = [_response_entry(w) for w in written]
    return {"resourceType": "Bundle", "type": f"{btype}-response", "entry": entries}


def _response_entry(result: ResourceResult) -> dict[str, Any]:
    out = result.write
    if out is None:
        return {"response": {"status": "422 Unprocessable Entity", "outcome": operation_outcome(list(result.issues))}}
    return {
        "response": {
            "status": out.status,
            "location": f"{out.resource_type}/{out.id}/_history/{out.version_id}",
            "etag": f'W/"{out.version_id}"',
        }
    }


def store_resources(
    session: Session,
    resources: Iterable[dict[str, Any]],
    codebook: Codebook,
    *,
    site_tz: tzinfo | None = None,
    base: str | None = None,
    server: str,
    fresh: bool = False,
) -> StoreResult:
    """Store resources as read from a FHIR server (ids kept; references on its own `base` made
    relative), each on its own: an invalid resource is rejected, never the others. A rejected
    resource of a patient is kept (RejectedInput) so that every later evaluation names it as
    left out; a usable newer version replaces it. No limit on their number. `fresh`: nothing of
    their patient is stored yet (nothing byte-identical to look for first)."""
    stored_form = [local_references(r, base) for r in resources] if base else list(resources)
    # a known patient's unchanged data: not checked again
    known = {} if fresh else _identical(session, stored_form, server)
    checked = {
        i: _check(Entry(res, str(res.get("resourceType"))), codebook, site_tz)
        for i, res in enumerate(stored_form)
        if i not in known
    }
    results = dict(known)
    results.update(zip(checked, _store(session, list(checked.values()), server), strict=True))
    # Rejections are kept in arrival order; a usable version clears a kept rejection that is not
    # newer, unless a rejected version of the same id came after it in this read.
    last_rejected: dict[tuple[str, str], int] = {}
    for i, c in checked.items():
        if results[i].outcome == "rejected":
            results[i], saved = _keep_rejected(session, c, results[i], server)
            if saved:
                last_rejected[(results[i].resource_type, results[i].id)] = i
    ordered = [results[i] for i in range(len(stored_form))]
    if last_rejected or repository.any_rejected(session):  # one query: most databases never hold one
        _clear_superseded(
            session,
            [
                res
                for i, (res, r) in enumerate(zip(stored_form, ordered, strict=True))
                if r.write and i > last_rejected.get((r.resource_type, r.id), -1)
            ],
            server,
        )
    stored_now: Checked = {}
    for i, c in checked.items():
        write = results[i].write
        # Reading the stored JSON must give this very resource: orjson writes NaN and Infinity
        # (which a standard-library parse lets through) as null, so no null at all.
        if c.body is not None and b"null" not in c.body and write is not None and write.changed:
            stored_now[(write.resource_type, write.id, write.version_id)] = (c.entry.resource, c.checked)
    return StoreResult(tuple(ordered), stored_now)


def _body(res: dict[str, Any]) -> bytes | None:
    """The resource as storage keeps it; None when JSON cannot hold it (an integer beyond 64 bits)."""
    try:
        return orjson.dumps(res)
    except TypeError:
        return None


def _storable(res: dict[str, Any]) -> bool:
    return _body(res) is not None


def _identical(session: Session, resources: list[dict[str, Any]], server: str) -> dict[int, ResourceResult]:
    """ "unchanged" (by position) for each resource stored byte for byte as it is: it passed the
    checks when it was stored. One read for all: a known patient's hook or poll mostly re-reads
    what is stored, and checking and upserting it again costs more than grading it."""
    keys = [(str(r.get("resourceType")), str(r.get("id"))) for r in resources]
    stored = repository.stored_bodies(session, [k for k in keys if FHIR_ID.fullmatch(k[1])], server=server)
    out: dict[int, ResourceResult] = {}
    for i, (key, res) in enumerate(zip(keys, resources, strict=True)):
        found = stored.get(key)
        if found is not None and found[0] == _body(res):
            write = repository.WriteOutcome(key[0], key[1], found[1], "200 OK", changed=False)
            out[i] = ResourceResult(key[0], key[1], "unchanged", write=write)
    return out


def _keep_rejected(
    session: Session, checked: _Checked, result: ResourceResult, server: str
) -> tuple[ResourceResult, bool]:
    """Keep a rejected resource of a patient unless a newer usable version is stored (the EHR's
    version order; arrival order among versions that do not say theirs). Also returns whether
    it was saved in rejected_input."""
    res = checked.entry.resource
    if (
        checked.patient_id is None
        or not FHIR_ID.fullmatch(result.id)
        or meta_issues(res.get("meta"), "")
        or not _storable(res)
    ):
        # nothing to keep it by (or its meta or JSON is the problem): named in this evaluation only
        return result, False
    stored = repository.stored_version(session, result.resource_type, result.id, server=server)
    meta = res.get("meta") or {}
    unversioned = not (meta.get("versionId") or meta.get("lastUpdated"))  # replaces any, as the upsert does
    saved = stored is None or unversioned or not version_key_of(*stored) > version_key(res)
    if saved:
        repository.save_rejected(session, res, checked.patient_id, server=server)
    return replace(result, kept=True), saved


def _clear_superseded(session: Session, stored: list[dict[str, Any]], server: str) -> None:
    """Usable versions just stored replace kept rejections that are not newer."""
    kept = repository.rejected_versions(
        session, [(str(r["resourceType"]), str(r["id"])) for r in stored], server=server
    )
    if not kept:
        return
    cleared = {
        key
        for res in stored
        if (key := (str(res["resourceType"]), str(res["id"]))) in kept
        and not version_key_of(*kept[key]) > version_key(res)
    }
    repository.clear_rejected(session, cleared, server=server)


def store_one(
    session: Session,
    res: Any,
    rtype: str,
    rid: str | None,
    codebook: Codebook,
    site_tz: tzinfo | None,
    *,
    server: str,
) -> repository.WriteOutcome:
    if not isinstance(res, dict) or res.get("resourceType") != rtype:
        raise FhirError.one(400, "value", f"body resourceType must be {rtype}", "resourceType")
    if rid is not None and res.get("id") not in (None, rid):
        raise FhirError.one(400, "value", "body id differs from the id in the URL", f"{rtype}.id")
    res = {**res, "id": rid or res.get("id") or repository.new_id()}
    checked = _check(Entry(res, rtype), codebook, site_tz)
    if checked.issues:
        raise FhirError(422, checked.issues)
    (out,) = repository.upsert_resources(session, [new_version(res, checked.patient_id, server, checked.body)])
    if repository.any_rejected(session):
        _clear_superseded(session, [res], server)
    return out


def evaluate_stored(
    session: Session,
    patient_id: str,
    codebook: Codebook,
    settings: Settings,
    at: datetime | None,
    recorded: datetime,
    *,
    store: bool = True,
    fallback_at: datetime | None = None,
    unstored: Iterable[dict[str, Any]] = (),
    server: str,
    checked: Checked | None = None,
) -> Evaluation:
    """Grade the stored data of one patient; store (upsert) the RiskAssessments unless `store` is off.
    Without `at` and without timed input, grade at `fallback_at` (the Evaluation is `untimed`).
    Rejected EHR resources kept for the patient (RejectedInput), and `unstored` (ones just read
    that could not be kept: no id), replace a stored version of the same id and are graded
    leniently, so each is named as left out, never dropped.

    With a write-back target configured, storing also enqueues the outbox rows (transaction
    Bundles of the RiskAssessments and Provenance) in the same session: both commit or neither.
    """
    entries, strict = stored_entries(session, patient_id, unstored, server=server, checked=checked)
    evaluation = evaluate_entries(
        entries, codebook, settings, at, recorded, fallback_at=fallback_at, strict=strict, server=server
    )
    if store:
        store_evaluation(session, patient_id, evaluation, settings, recorded, server=server)
    return evaluation


def stored_entries(
    session: Session,
    patient_id: str,
    unstored: Iterable[dict[str, Any]] = (),
    *,
    server: str,
    checked: Checked | None = None,
) -> tuple[list[Entry], bool | None]:
    """The entries an evaluation of the stored patient reads, and its strictness (False when
    storage rejected some: they are named as left out, never a 422; None: the setting). 404
    without a stored Patient. `checked`: what this transaction just checked and stored
    (StoreResult.checked): a row this transaction stored is not read, parsed or normalised again."""
    known = checked or {}
    parsed = {key: res for key, (res, _) in known.items()}
    resources = repository.patient_inputs(session, patient_id, server=server, parsed=parsed)
    normalised = {id(res): found for res, found in known.values() if found is not None}  # the very objects read
    rejected = repository.rejected_inputs(session, patient_id, server=server)
    extra = list(unstored)
    # What storage rejected (kept, or just read) replaces a stored version of the same id.
    newer = {(r.get("resourceType"), r.get("id")) for r in (*rejected, *extra) if isinstance(r.get("id"), str)}
    resources = [r for r in resources if (r["resourceType"], r["id"]) not in newer] + rejected + extra
    if not any(r.get("resourceType") == "Patient" and r.get("id") == patient_id for r in resources):
        raise FhirError.one(404, "not-found", "no stored Patient with this id", "Patient.id")
    entries = [
        Entry(r, f"{r.get('resourceType')}/{r.get('id') or '(read without an id)'}", checked=normalised.get(id(r)))
        for r in resources
    ]
    return entries, (False if rejected or extra else None)


def store_evaluation(
    session: Session, patient_id: str, evaluation: Evaluation, settings: Settings, recorded: datetime, *, server: str
) -> None:
    """Upsert the RiskAssessments and Provenance and enqueue their write-back, in `session`."""
    base = settings.canonical_base
    emitted = [repository.Emitted(r, *index_fields(r, base)) for r in evaluation.resources]
    repository.save_emitted(session, patient_id, emitted, recorded, server=server)
    enqueue_writeback(session, patient_id, evaluation.resources, settings, recorded, server=server)  # same transaction


def writeback_target(settings: Settings, server: str) -> str | None:
    """Where the results of a patient of namespace `server` go: only to that namespace's own EHR
    server (the home server's for ""), when it is `IECTOX_WRITEBACK_TARGET` or the site writes
    back to each source (`IECTOX_WRITEBACK_TO_SOURCE`); else nowhere: another EHR's
    Patient/<id> is another person."""
    own = server or settings.home()
    if own == settings.writeback_target or (settings.writeback_to_source and own in settings.ehr_servers):
        return own
    return None


def enqueue_writeback(
    session: Session,
    patient_id: str,
    resources: list[dict[str, Any]],
    settings: Settings,
    now: datetime,
    *,
    server: str,
) -> int:
    """With a write-back target, add the evaluation's outbox rows to `session` (the caller's
    transaction: they commit with the stored RiskAssessments or not at all)."""
    target = writeback_target(settings, server)
    if target is None:
        return 0
    mode: Mode = "conditional" if settings.writeback_mode == "conditional" else "id"
    bundles = transaction_bundles(
        resources, settings.canonical_base, mode=mode, max_entries=settings.writeback_max_bundle_entries
    )
    request_id = current_request_id() or ""  # the worker's log lines for these rows carry it
    for bundle in bundles:
        outbox.enqueue(session, patient_id, target, bundle, now, request_id)
    return len(bundles)
