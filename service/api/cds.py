"""CDS Hooks 2.0 routes: discovery, patient-view, order-select, feedback. Parse, call, respond."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..cdshooks.feedback import check_feedback
from ..cdshooks.schemas import CdsResponse, HookRequest
from ..cdshooks.service import HookCall, call_hook, discovery, service_for
from ..ehr.sync import observation_codes
from ..fhir.errors import FhirError
from ..storage.models import CdsFeedback
from .auth import CdsClientDep
from .deps import ClockDep, CodebookDep, EngineDep, EvaluationCacheDep, SessionDep, SettingsDep
from .orjson_route import OrjsonRoute

router = APIRouter(prefix="/cds-services", tags=["CDS Hooks"], route_class=OrjsonRoute)


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
    req: HookRequest,
    request: Request,
    client: CdsClientDep,
    settings: SettingsDep,
    codebook: CodebookDep,
    engine: EngineDep,
    session: SessionDep,
    clock: ClockDep,
    evaluations: EvaluationCacheDep,
) -> JSONResponse:
    # The client JWT's jti is recorded in the request session: commit it now, so the token is
    # spent whatever happens next, and so the evaluation's own transaction does not wait on
    # this one (SQLite allows one writer).
    await run_in_threadpool(session.commit)
    service = service_for(service_id)
    public_base = settings.auth_public_base_url or str(request.base_url)
    # The prefetch as sent, when api/orjson_route.py set it aside unparsed (req.prefetch is then None).
    raw = getattr(request.state, "raw_prefetch", None)
    call = HookCall(service, req, client.actor, client.iss, public_base, raw)
    response = await call_hook(call, settings, codebook, engine, clock(), evaluations)
    return JSONResponse(response.model_dump())


@router.post("/{service_id}/feedback", summary="CDS Hooks feedback (stored as received)", response_model=dict[str, Any])
async def feedback(
    service_id: str, request: Request, _client: CdsClientDep, session: SessionDep, clock: ClockDep
) -> dict[str, Any]:
    service_for(service_id)  # 404 for an unknown service
    # The client JWT's jti is spent now: no write transaction stays open while the client sends
    # its body (SQLite has one writer; a slow upload would hold everyone else up).
    await run_in_threadpool(session.commit)
    body = await request.body()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FhirError.one(400, "structure", "feedback must be JSON", "body") from None
    check_feedback(doc)
    session.add(CdsFeedback(service_id=service_id, received=clock(), body=body))
    return {}
