"""FHIR Bulk Data export of stored results under /fhir: kick-off, status, files, cancel.
Parse, call, respond: the job is service/app/bulk.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, Query, Request
from fastapi.responses import Response
from sqlmodel import Session

from ..app.bulk import (
    COMPLETE,
    EXPORT_TYPES,
    IN_PROGRESS,
    delete_export,
    export_file,
    export_status,
    owned_job,
    parse_since,
    requested_types,
    run_export,
    start_export,
)
from ..config.settings import Settings
from ..fhir.errors import FhirError, Issue, operation_outcome
from ..security.scopes import READ, Principal
from ..storage.models import ExportJob
from .auth import PrincipalDep, ServerDep, requires
from .deps import ClockDep, EngineDep, ReadSessionDep, SessionDep, SettingsDep
from .responses import FhirResponse
from .schemas import ERRORS

router = APIRouter(prefix="/fhir", tags=["FHIR Bulk Data"], responses=ERRORS)
NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = (None, NDJSON, "application/ndjson", "ndjson")
AUTH = requires(READ, *EXPORT_TYPES)["responses"]


def _base(request: Request, settings: Settings) -> str:
    return (settings.auth_public_base_url or str(request.base_url)).rstrip("/") + "/fhir"


def _job(session: Session, job_id: str, principal: Principal) -> ExportJob:
    """The caller's own job, with read on what it exports."""
    job = owned_job(session, job_id, principal.actor)
    principal.require(READ, *job.types.split(","))
    return job


# Bulk Data kick-off parameters this server does not support: a 400 unless the client accepts
# lenient handling (Bulk Data Access v2).
UNSUPPORTED = ("_typeFilter", "patient", "_elements", "includeAssociatedData", "_until")


@router.get(
    "/$export",
    summary="Bulk Data export of the stored RiskAssessments and Provenance (asynchronous kick-off)",
    description="FHIR Bulk Data Access (system level). Needs `Prefer: respond-async`; `_type` "
    "(RiskAssessment, Provenance; default both), `_since` (an instant: versions stored at or after it), "
    "`_outputFormat` (NDJSON only). Answers 202 with `Content-Location`: the status URL to poll. Needs read on "
    "each type exported.",
    status_code=202,
    response_class=Response,
    responses={202: {"description": "Accepted: poll the URL in Content-Location"}, **AUTH},
)
def kickoff(
    request: Request,
    principal: PrincipalDep,
    server: ServerDep,
    session: SessionDep,
    engine: EngineDep,
    settings: SettingsDep,
    clock: ClockDep,
    background: BackgroundTasks,
    type_: Annotated[str | None, Query(alias="_type", description="RiskAssessment,Provenance")] = None,
    since: Annotated[str | None, Query(alias="_since", description="FHIR instant")] = None,
    output_format: Annotated[str | None, Query(alias="_outputFormat")] = None,
    prefer: Annotated[str | None, Header(description="must be `respond-async`")] = None,
) -> Response:
    if "respond-async" not in (prefer or "").lower():
        raise FhirError.one(400, "required", "a Bulk Data kick-off needs the header Prefer: respond-async", "Prefer")
    given = [p for p in UNSUPPORTED if p in request.query_params]
    if given and "handling=lenient" not in (prefer or "").replace(" ", "").lower():
        raise FhirError.one(400, "not-supported", f"{given[0]} is not supported by this server", given[0])
    if output_format is not None:
        output_format = output_format.replace(" ", "+")  # an unencoded + in the query reads as a space
    if output_format not in OUTPUT_FORMATS:
        raise FhirError.one(400, "not-supported", f"_outputFormat: this server writes {NDJSON}", "_outputFormat")
    types = requested_types(type_)
    principal.require(READ, *types)
    job_id = start_export(session, types, parse_since(since), str(request.url), principal.actor, clock(), server=server)
    background.add_task(run_export, engine, job_id, clock)  # after the job row is committed
    return Response(
        status_code=202, headers={"Content-Location": f"{_base(request, settings)}/$export-status/{job_id}"}
    )


@router.get(
    "/$export-status/{job_id}",
    summary="Bulk Data export status: 202 while it runs, 200 with the manifest when complete",
    response_class=Response,
    responses={200: {"description": "The manifest (JSON)"}, 202: {"description": "In progress"}, **AUTH},
)
def status(
    job_id: str,
    request: Request,
    principal: PrincipalDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    clock: ClockDep,
) -> Response:
    job = _job(session, job_id, principal)
    found = export_status(session, job, _base(request, settings), clock(), settings.export_max_minutes)
    if found.status == IN_PROGRESS:
        return Response(status_code=202, headers={"X-Progress": "in-progress", "Retry-After": "2"})
    if found.status == COMPLETE:
        return FhirResponse(found.manifest, media_type="application/json")
    return FhirResponse(operation_outcome([Issue("exception", f"the export failed: {found.error}")]), status_code=500)


@router.delete(
    "/$export-status/{job_id}",
    summary="Cancel a Bulk Data export, or delete its files",
    status_code=202,
    response_class=Response,
    responses=AUTH,
)
def cancel(job_id: str, principal: PrincipalDep, session: SessionDep) -> Response:
    delete_export(session, _job(session, job_id, principal))
    return Response(status_code=202)


@router.get(
    "/$export-file/{job_id}/{name}",
    summary="One NDJSON file of a completed Bulk Data export",
    response_class=Response,
    responses={200: {"content": {NDJSON: {}}, "description": "NDJSON, one resource per line"}, **AUTH},
)
def file(job_id: str, name: str, principal: PrincipalDep, session: ReadSessionDep) -> Response:
    found = export_file(session, _job(session, job_id, principal), name)
    return Response(found.body, media_type=NDJSON)
