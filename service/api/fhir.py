"""FHIR endpoints under /fhir. Routes only parse, call a service and respond."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from ..app.audit import audit_event_of
from ..app.evaluate import evaluate_body, parse_at
from ..app.store import evaluate_stored, store_bundle, store_one
from ..codebook import Codebook
from ..config.settings import Settings
from ..fhir.capability import capability_statement
from ..fhir.errors import FhirError
from ..fhir.ingest import load_json
from ..fhir.terminology import code_systems, operation_definitions
from ..security.scopes import READ, WRITE
from ..storage import repository
from .auth import PrincipalDep, ServerDep, bundle_types, requires
from .deps import ClockDep, CodebookDep, ReadSessionDep, SessionDep, SettingsDep
from .responses import FhirResponse
from .schemas import ERRORS, FhirBundle, FhirResource, fhir_body

router = APIRouter(prefix="/fhir", tags=["FHIR"], default_response_class=FhirResponse, responses=ERRORS)

AtQuery = Annotated[
    str | None,
    Query(description="Evaluation time (FHIR dateTime with timezone). Default: the latest input time."),
]
PreferHeader = Annotated[
    str | None,
    Header(
        description="`handling=strict`: an input the rules cannot use (bad date, unknown unit, implausible value) "
        "is a 422 OperationOutcome; `handling=lenient` (the default, setting `IECTOX_INPUT_HANDLING`): it is left "
        "out, named in the rationale and in a warning OperationOutcome entry of the result Bundle."
    ),
]
INPUT_TYPES = ("Observation", "MedicationAdministration", "Patient", "Procedure")


def handling_strict(prefer: str | None) -> bool | None:
    """`Prefer: handling=strict|lenient` (FHIR RESTful API) as a flag; None: not given."""
    for part in (prefer or "").replace(";", ",").split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "handling" and value.strip().strip('"').lower() in ("strict", "lenient"):
            return value.strip().strip('"').lower() == "strict"
    return None


@router.get("/metadata", summary="CapabilityStatement", response_model=FhirResource)
def metadata(settings: SettingsDep) -> FhirResponse:
    return FhirResponse(capability_statement(settings.canonical_base))


@router.post(
    "/$evaluate",
    summary="Grade a Bundle statelessly (ASTCT 2019 CRS and ICANS)",
    description="Body: a collection, batch or transaction Bundle holding one Patient and its Observations, "
    "MedicationAdministrations, Procedures and Conditions. Returns a collection Bundle: per scale a RiskAssessment "
    "with code `current-grade` and one with code `max-grade` (the course since day 0); the risk scores as "
    "RiskAssessments with code `risk-score`, whose value is in the extension `<base>/StructureDefinition/score` "
    "(valueDecimal), with probabilities as fractions 0-1 and qualitativeRisk only where a verified cut-off exists; "
    "and one Provenance; with lenient handling (the default) an OperationOutcome (severity warning) naming each "
    "input left out of grading with its FHIRPath and reason. Nothing is stored.",
    response_model=FhirBundle,
    openapi_extra=fhir_body(FhirBundle, "Bundle with the Patient and its inputs"),
    **requires(READ, "Observation"),
)
async def evaluate(
    request: Request,
    settings: SettingsDep,
    codebook: CodebookDep,
    clock: ClockDep,
    at: AtQuery = None,
    prefer: PreferHeader = None,
) -> FhirResponse:
    body = await request.body()
    # Parsing and grading are CPU-bound: off the event loop, so /healthz and other requests answer.
    evaluation = await run_in_threadpool(
        evaluate_body, body, codebook, settings, parse_at(at), clock(), strict=handling_strict(prefer)
    )
    return FhirResponse(evaluation.bundle())


@router.post(
    "",
    summary="Store a transaction or batch Bundle",
    description="Transactions are atomic: every entry is checked first and nothing is stored unless all pass. "
    "Writes are idempotent on id + meta.versionId.",
    response_model=FhirBundle,
    openapi_extra=fhir_body(FhirBundle, "transaction or batch Bundle"),
    **requires(WRITE),
)
async def transaction(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    codebook: CodebookDep,
    principal: PrincipalDep,
    server: ServerDep,
) -> FhirResponse:
    doc = await run_in_threadpool(load_json, await request.body())
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        raise FhirError.one(422, "structure", "expected a Bundle", "Bundle")
    principal.require(WRITE, *bundle_types(doc))
    return FhirResponse(await run_in_threadpool(partial(store_bundle, server=server), session, doc, codebook, settings))


@router.post(
    "/Patient/{patient_id}/$evaluate",
    summary="Grade a stored patient and store the RiskAssessments",
    description="Re-running with the same inputs and `at` updates the stored assessments (stable ids).",
    response_model=FhirBundle,
    **requires(WRITE, "RiskAssessment"),
)
def evaluate_patient(
    patient_id: str,
    session: SessionDep,
    settings: SettingsDep,
    codebook: CodebookDep,
    clock: ClockDep,
    server: ServerDep,
    at: AtQuery = None,
) -> FhirResponse:
    evaluation = evaluate_stored(session, patient_id, codebook, settings, parse_at(at), clock(), server=server)
    return FhirResponse(evaluation.bundle())


@router.get(
    "/Patient/{patient_id}/$course",
    summary="The course of a stored patient on every scale",
    description="From day 0 (the CAR T infusion) to `at`, for each scale: current and maximum grade, onset, peak "
    "time, resolution, duration and the daily maximum grade, as a FHIR Parameters resource with one `course` "
    "parameter per scale. Nothing is stored.",
    response_model=FhirResource,
    **requires(READ, "Observation"),
)
def course(
    patient_id: str,
    session: ReadSessionDep,
    settings: SettingsDep,
    codebook: CodebookDep,
    clock: ClockDep,
    server: ServerDep,
    at: AtQuery = None,
) -> FhirResponse:
    evaluation = evaluate_stored(
        session, patient_id, codebook, settings, parse_at(at), clock(), store=False, server=server
    )
    return FhirResponse(evaluation.course_parameters(settings))


@router.get(
    "/RiskAssessment/{ra_id}",
    summary="Read a stored RiskAssessment",
    response_model=FhirResource,
    **requires(READ, "RiskAssessment"),
)
def read_assessment(ra_id: str, session: ReadSessionDep, server: ServerDep) -> FhirResponse:
    res = repository.get_emitted(session, "RiskAssessment", ra_id, server=server)
    if res is None:
        raise FhirError.one(404, "not-found", "no such RiskAssessment", "RiskAssessment.id")
    return FhirResponse(res)


@router.get(
    "/RiskAssessment",
    summary="Search stored RiskAssessments",
    response_model=FhirBundle,
    **requires(READ, "RiskAssessment"),
)
def search_assessments(
    session: ReadSessionDep,
    server: ServerDep,
    subject: Annotated[str | None, Query(description="Patient/<id> or <id>")] = None,
    method: Annotated[str | None, Query(description="method code, or system|code")] = None,
    sort: Annotated[str, Query(alias="_sort", pattern="^-?date$")] = "-date",
    count: Annotated[int, Query(alias="_count", ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(alias="_offset", ge=0, le=2**31 - 1)] = 0,
) -> FhirResponse:
    patient_id = subject.removeprefix("Patient/") if subject else None
    code = method.split("|")[-1] if method else None
    newest = sort.startswith("-")
    total, found = repository.search_assessments(session, patient_id, code, newest, count, offset, server=server)
    return FhirResponse(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "entry": [
                {"fullUrl": f"RiskAssessment/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in found
            ],
        }
    )


@router.get(
    "/CodeSystem/{cs_id}", summary="A CodeSystem of iectox, at its canonical URL (open)", response_model=FhirResource
)
def read_code_system(cs_id: str, settings: SettingsDep, codebook: CodebookDep) -> FhirResponse:
    found = code_systems(settings.canonical_base, codebook).get(cs_id)
    if found is None:
        raise FhirError.one(404, "not-found", "no such CodeSystem", "CodeSystem.id")
    return FhirResponse(found)


@router.get(
    "/OperationDefinition/{op_id}",
    summary="An OperationDefinition of iectox, at its canonical URL (open)",
    response_model=FhirResource,
)
def read_operation_definition(op_id: str, settings: SettingsDep) -> FhirResponse:
    found = operation_definitions(settings.canonical_base).get(op_id)
    if found is None:
        raise FhirError.one(404, "not-found", "no such OperationDefinition", "OperationDefinition.id")
    return FhirResponse(found)


AUDIT_DATE = re.compile(r"^(ge|gt|le|lt)(.+)$")
DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _audit_bounds(dates: list[str]) -> list[tuple[str, datetime]]:
    """`date` search values: ge, gt, le or lt and a dateTime with a timezone, or a date (its day
    in UTC: ge2026-01-02 is from its start, le2026-01-02 to its end)."""
    why = "date must be ge, gt, le or lt and a date (YYYY-MM-DD) or a dateTime with a timezone"
    bounds = []
    for raw in dates:
        m = AUDIT_DATE.match(raw)
        if not m:
            raise FhirError.one(400, "value", why, "date")
        op, value = m.groups()
        try:
            if DATE_ONLY.match(value):
                day = datetime.fromisoformat(value).replace(tzinfo=UTC)
                # after the day: from the next day on; up to its end: before the next day
                next_day = {"gt": "ge", "le": "lt"}
                bounds.append((next_day[op], day + timedelta(days=1)) if op in next_day else (op, day))
                continue
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if t.tzinfo is None:
                raise ValueError
            t.astimezone(UTC)  # an instant beyond the representable range is a 400, not a 500
        except (ValueError, OverflowError):
            raise FhirError.one(400, "value", why, "date") from None
        bounds.append((op, t))
    return bounds


@router.get(
    "/AuditEvent",
    summary="Search the audit trail as FHIR AuditEvents (IHE Basic Audit Log Patterns)",
    description="Every access (read, write, evaluate, hook, app view, rejected call) as an AuditEvent: who (the "
    "client or user), what (the patient and the resource), the outcome. `patient` (Patient/<id> or <id>), `date` "
    "(repeatable, with ge, gt, le or lt and a timezone), `_count` (at most 1000). Newest first. Needs read on "
    "AuditEvent (its own scope, e.g. system/AuditEvent.rs).",
    response_model=FhirBundle,
    **requires(READ, "AuditEvent"),
)
def search_audit_events(
    session: ReadSessionDep,
    settings: SettingsDep,
    server: ServerDep,
    patient: Annotated[str | None, Query(description="Patient/<id> or <id>")] = None,
    date: Annotated[list[str] | None, Query(description="ge2026-01-01T00:00:00Z, lt...")] = None,
    count: Annotated[int, Query(alias="_count", ge=1, le=1000)] = 100,
) -> FhirResponse:
    patient_id = patient.removeprefix("Patient/") if patient else None
    rows = repository.audit_events(session, patient_id, count, _audit_bounds(date or []), server=server)
    entries = [
        {"fullUrl": f"AuditEvent/{row.id}", "resource": audit_event_of(row, settings), "search": {"mode": "match"}}
        for row in rows
    ]
    return FhirResponse({"resourceType": "Bundle", "type": "searchset", "entry": entries})


def _store_one(
    session: Session, res: Any, rtype: str, rid: str | None, codebook: Codebook, settings: Settings, server: str
) -> FhirResponse:
    """Store one resource and read it back as stored (in one worker thread: database work never
    runs on the event loop)."""
    out = store_one(session, res, rtype, rid, codebook, settings.site_tz(), server=server)
    return _written(session, out, server)


def _written(session: Session, out: repository.WriteOutcome, server: str) -> FhirResponse:
    res = repository.read_resource(session, out.resource_type, out.id, server=server) or {}
    location = f"{out.resource_type}/{out.id}/_history/{out.version_id}"
    return FhirResponse(
        res,
        status_code=201 if out.status.startswith("201") else 200,
        headers={"Location": location, "ETag": f'W/"{out.version_id}"'},
    )


def _input_routes(rtype: str) -> None:
    body = fhir_body(FhirResource, f"a {rtype} resource")

    @router.post(
        f"/{rtype}",
        summary=f"Create a {rtype}",
        status_code=201,
        response_model=FhirResource,
        openapi_extra=body,
        operation_id=f"create_{rtype}",
        **requires(WRITE, rtype),
    )
    async def create(
        request: Request, session: SessionDep, settings: SettingsDep, codebook: CodebookDep, server: ServerDep
    ) -> FhirResponse:
        res = load_json(await request.body())
        return await run_in_threadpool(_store_one, session, res, rtype, None, codebook, settings, server)

    @router.put(
        f"/{rtype}/{{rid}}",
        summary=f"Create or update a {rtype}",
        response_model=FhirResource,
        openapi_extra=body,
        operation_id=f"update_{rtype}",
        **requires(WRITE, rtype),
    )
    async def update(
        rid: str, request: Request, session: SessionDep, settings: SettingsDep, codebook: CodebookDep, server: ServerDep
    ) -> FhirResponse:
        res = load_json(await request.body())
        return await run_in_threadpool(_store_one, session, res, rtype, rid, codebook, settings, server)

    @router.get(
        f"/{rtype}/{{rid}}",
        summary=f"Read a stored {rtype}",
        response_model=FhirResource,
        operation_id=f"read_{rtype}",
        **requires(READ, rtype),
    )
    def read(rid: str, session: ReadSessionDep, server: ServerDep) -> FhirResponse:
        res = repository.read_resource(session, rtype, rid, server=server)
        if res is None:
            raise FhirError.one(404, "not-found", f"no such {rtype}", f"{rtype}.id")
        return FhirResponse(res)


for _t in INPUT_TYPES:
    _input_routes(_t)
