"""CDS Hooks 2.0 routes: discovery, patient-view, order-select, feedback. Parse, call, respond."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine

from ..cds import (
    ORDER_SELECT,
    PATIENT_VIEW,
    PREFETCH_KEYS,
    CardContext,
    discovery,
    order_select_cards,
    ordered_concepts,
    patient_view_cards,
    resources_of,
)
from ..codebook import Codebook
from ..ehr.client import FhirClient, FhirServerConfig
from ..ehr.client import FhirError as EhrError
from ..ehr.sync import observation_codes, store_and_evaluate
from ..evaluate import Evaluation
from ..fhir.errors import FhirError, Issue
from ..fhir.ingest import FHIR_ID, Entry, parse_patient_entries
from ..settings import Settings
from ..storage.models import AuditEvent, CdsFeedback
from .auth import CdsClientDep
from .deps import ClockDep, CodebookDep, EngineDep, SessionDep, SettingsDep

router = APIRouter(prefix="/cds-services", tags=["CDS Hooks"])
SERVICES = (PATIENT_VIEW, ORDER_SELECT)


class FhirAuthorization(BaseModel):
    access_token: str
    token_type: str = "Bearer"  # noqa: S105 (the token type name, not a secret)
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None


class HookRequest(BaseModel):
    """CDS Hooks 2.0 HookRequest (the fields this service reads)."""

    model_config = ConfigDict(extra="allow")

    hook: str
    hookInstance: str
    context: dict[str, Any]
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    prefetch: dict[str, Any] | None = Field(default=None)


class CdsResponse(BaseModel):
    cards: list[dict[str, Any]]
    systemActions: list[dict[str, Any]] = Field(default_factory=list)


def _failed(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


def _server_for(url: str | None, settings: Settings) -> tuple[str, FhirServerConfig]:
    """The configured EHR server whose base URL is `fhirServer` (never an arbitrary URL: no SSRF,
    no token sent to a server the site did not configure)."""
    if url:
        for name, server in settings.ehr_servers.items():
            if server.base_url.rstrip("/") == url.rstrip("/"):
                return name, server
    raise FhirError.one(
        412, "not-found", "the data are not in the prefetch and fhirServer is not a configured EHR server", "fhirServer"
    )


async def _fetch_missing(
    req: HookRequest, patient_id: str, missing: list[str], settings: Settings, codebook: Codebook
) -> tuple[str, list[dict[str, Any]]]:
    target, server = _server_for(req.fhirServer, settings)
    token = req.fhirAuthorization.access_token if req.fhirAuthorization else None
    searches = {
        "observations": ("Observation", {"patient": patient_id, "code": ",".join(observation_codes(codebook))}),
        "medications": ("MedicationAdministration", {"patient": patient_id}),
        "conditions": ("Condition", {"patient": patient_id}),
        "procedures": ("Procedure", {"patient": patient_id}),
    }
    out: list[dict[str, Any]] = []
    try:
        async with FhirClient(server, token=token) as client:
            for key in missing:
                if key == "patient":
                    patient = await client.read("Patient", patient_id)
                    out += [patient] if patient else []
                else:
                    rtype, params = searches[key]
                    out += await client.search(rtype, dict(params))
    except EhrError as exc:
        raise FhirError.one(
            412,
            "transient",
            f"the missing data could not be fetched from fhirServer ({type(exc).__name__})",
            "fhirServer",
        ) from None
    return target, out


def _evaluate(
    engine: Engine,
    actor: str,
    route: str,
    patient_id: str,
    resources: list[dict[str, Any]],
    target: str | None,
    codebook: Codebook,
    settings: Settings,
    now: datetime,
) -> Evaluation:
    # The audit trail middleware covers /fhir; a hook reads and writes a patient too.
    audit = AuditEvent(recorded=now, actor=actor, action="hook", route=route, patient_id=patient_id, status=200)
    evaluation, _ = store_and_evaluate(
        engine, patient_id, resources, codebook, settings, now, target=target, audit=audit
    )
    assert evaluation is not None  # the caller checked that the Patient is among the resources
    return evaluation


def _indications(resources: list[dict[str, Any]], codebook: Codebook) -> list[str]:
    conditions = [Entry(r, f"Condition/{r.get('id')}") for r in resources if r.get("resourceType") == "Condition"]
    patient = [Entry(r, f"Patient/{r.get('id')}") for r in resources if r.get("resourceType") == "Patient"]
    try:
        data = parse_patient_entries(patient + conditions, codebook).data
    except FhirError:
        return []
    return sorted({v for v, _ in data.indications})


@router.get("", summary="CDS Hooks discovery", response_model=dict[str, Any])
def services(codebook: CodebookDep) -> dict[str, Any]:
    return discovery(observation_codes(codebook))


@router.post(
    "/{service_id}",
    summary="Call a CDS service (patient-view or order-select)",
    description="Needs a CDS client JWT (ES384/RS384, allowlisted iss, aud = this URL). Uses the prefetch when it "
    "has every key; fetches what is missing from fhirServer (a configured EHR server) with fhirAuthorization, else "
    "SMART Backend Services; 412 when the data cannot be obtained. The evaluation is stored and written back.",
    response_model=CdsResponse,
)
async def call_service(
    service_id: str,
    request: Request,
    client: CdsClientDep,
    settings: SettingsDep,
    codebook: CodebookDep,
    engine: EngineDep,
    session: SessionDep,
    clock: ClockDep,
) -> JSONResponse:
    # The client JWT's jti is recorded in the request session: commit it now, so the token is
    # spent whatever happens next, and so the evaluation's own transaction does not wait on
    # this one (SQLite allows one writer).
    await run_in_threadpool(session.commit)
    if service_id not in SERVICES:
        raise FhirError.one(404, "not-found", f"no CDS service {service_id!r}", "service_id")
    try:
        req = HookRequest.model_validate(orjson.loads(await request.body()))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise FhirError.one(400, "structure", f"not a CDS Hooks request: {type(exc).__name__}", "body") from None
    hook = "patient-view" if service_id == PATIENT_VIEW else "order-select"
    if req.hook != hook:
        raise FhirError.one(400, "value", f"this service answers the {hook} hook", "hook")
    patient_id = req.context.get("patientId")
    if not isinstance(patient_id, str) or not FHIR_ID.fullmatch(patient_id):
        raise FhirError.one(400, "required", "context.patientId (a FHIR id) is required", "context.patientId")
    orders = ordered_concepts(req.context, codebook) if service_id == ORDER_SELECT else []
    if service_id == ORDER_SELECT and not orders:
        return JSONResponse(CdsResponse(cards=[]).model_dump())
    prefetch = req.prefetch or {}
    # A key the EHR did not fill is absent (or carries an OperationOutcome): fetch it. null = no data.
    missing = [key for key in PREFETCH_KEYS if key not in prefetch or _failed(prefetch[key])]
    resources = [r for key in PREFETCH_KEYS if key not in missing for r in resources_of(prefetch[key])]
    target: str | None = None
    if missing:
        target, fetched = await _fetch_missing(req, patient_id, missing, settings, codebook)
        resources += fetched
    if not any(r.get("resourceType") == "Patient" and r.get("id") == patient_id for r in resources):
        raise FhirError.one(
            412, "not-found", "the Patient is neither in the prefetch nor on fhirServer", "context.patientId"
        )
    route = f"/cds-services/{service_id}"
    evaluation = await run_in_threadpool(
        _evaluate, engine, client.actor, route, patient_id, resources, target, codebook, settings, clock()
    )
    base = settings.auth_public_base_url or str(request.base_url)
    ctx = CardContext(patient_id, f"{base.rstrip('/')}/fhir/Patient/{patient_id}/$course")
    if service_id == PATIENT_VIEW:
        cards = patient_view_cards(evaluation, ctx)
    else:
        cards = order_select_cards(evaluation, ctx, orders, _indications(resources, codebook))
    return JSONResponse(CdsResponse(cards=cards).model_dump())


@router.post("/{service_id}/feedback", summary="CDS Hooks feedback (stored as received)", response_model=dict[str, Any])
async def feedback(
    service_id: str, request: Request, _client: CdsClientDep, session: SessionDep, clock: ClockDep
) -> dict[str, Any]:
    if service_id not in SERVICES:
        raise FhirError.one(404, "not-found", f"no CDS service {service_id!r}", "service_id")
    body = await request.body()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FhirError.one(400, "structure", "feedback must be JSON", "body") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("feedback"), list):
        raise FhirError(400, [Issue("required", "feedback must be an object with a feedback array", "feedback")])
    session.add(CdsFeedback(service_id=service_id, received=clock(), body=body))
    return {}
