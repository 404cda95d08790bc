"""The clinician app (/app/): its pages, its scripts (served here: no CDN), its configuration
and the JSON it reads. Parse, call, respond: what the pages show is built in app/view.py.

The pages are static shells; the data come from /app/api/*, which needs a bearer token: the
access token the EHR issued to the app at its SMART launch (or a token of the service's own
issuer), with user/ (or system/) read scopes on Patient, Observation, MedicationAdministration
and RiskAssessment. In dev mode (loopback only) no token is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..app.view import WorklistCache, patient_view, worklist
from ..config.clock import utc_now
from ..fhir.errors import FhirError
from ..fhir.ingest import STORABLE_TYPES
from ..security.bearer import verify_access_token, verify_app_token
from ..security.config import DEV, is_loopback
from ..security.errors import unauthorized
from ..security.jws import peek
from ..security.scopes import DEV as DEV_PRINCIPAL
from ..security.scopes import READ, Principal
from ..storage import repository
from .auth import BearerDep, SecurityDep, _token, requires
from .deps import ClockDep, CodebookDep, ReadSessionDep, SettingsDep

WEB = Path(__file__).resolve().parent.parent / "web"
READ_TYPES = ("Patient", "Observation", "MedicationAdministration", "RiskAssessment")
# The pages load only what iectox serves (hospital networks block CDNs); the SMART launch talks
# to the EHR's authorization server, whose address is known only at launch.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src *; object-src 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/app", tags=["Clinician app"])


def app_user(request: Request, settings: SettingsDep, security: SecurityDep, credentials: BearerDep) -> Principal:
    """The app's user: the EHR's access token from the SMART launch (when the clinician app is
    configured) or a token of the service's issuer; "dev" in dev mode, loopback clients only.
    403 unless its scopes allow reading what the pages show."""
    if security.mode == DEV:
        if request.client is None or not is_loopback(request.client.host):
            raise unauthorized("dev mode accepts loopback clients only", "dev mode loopback only")
        principal = DEV_PRINCIPAL
    else:
        token = _token(request, credentials)
        _, claims = peek(token)
        if security.app is not None and claims.get("iss") == settings.app_issuer:
            principal = verify_app_token(token, settings, security.app, utc_now())
        else:
            assert security.bearer is not None
            principal = verify_access_token(token, settings, security.bearer, utc_now())
    request.state.principal = principal  # for the audit trail
    principal.require(READ, *READ_TYPES)
    return principal


AppUserDep = Annotated[Principal, Depends(app_user)]
# 401 / 403 in the OpenAPI document, as the /fhir routes declare them
AUTH_RESPONSES = requires(READ, *READ_TYPES)["responses"]


def get_worklist_cache(request: Request) -> WorklistCache:
    cache: WorklistCache = request.app.state.worklist
    return cache


def _page(name: str) -> FileResponse:
    return FileResponse(WEB / name, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/", include_in_schema=False)
def worklist_page() -> FileResponse:
    return _page("worklist.html")


@router.get("/Patient/{patient_id}", include_in_schema=False)
def patient_page(patient_id: str) -> FileResponse:
    return _page("patient.html")


@router.get("/launch", include_in_schema=False)
def launch_page() -> FileResponse:
    return _page("launch.html")


@router.get("/callback", include_in_schema=False)
def callback_page() -> FileResponse:
    return _page("callback.html")


@router.get(
    "/config.json",
    summary="The clinician app's configuration (no secrets)",
    description="What the app's scripts need to launch: dev mode (no login), or the SMART client id, the EHR FHIR "
    "base it launches from, and the scopes it asks for.",
    response_model=dict[str, Any],
)
def app_config(settings: SettingsDep, security: SecurityDep) -> dict[str, Any]:
    return {
        "dev": security.mode == DEV,
        "smart": security.app is not None,
        "client_id": settings.app_client_id,
        "fhir_base": settings.app_fhir_base,
        "scope": settings.app_scope,
        "needs": [f"user/{t}.rs" for t in READ_TYPES],
        "fhir": "/fhir",
    }


@router.get(
    "/api/worklist",
    summary="The unit worklist: every stored patient, worst current grade first",
    description="Per patient: current ASTCT CRS and ICANS grades (indeterminate with the grade already proven), "
    "day since infusion, product, and what changed in the 24 hours before the latest input (grade changes on the "
    "hourly course, drugs started).",
    response_model=list[dict[str, Any]],
    responses=AUTH_RESPONSES,
)
async def api_worklist(
    _user: AppUserDep,
    request: Request,
    session: ReadSessionDep,
    settings: SettingsDep,
    codebook: CodebookDep,
    clock: ClockDep,
) -> JSONResponse:
    rows = await run_in_threadpool(worklist, session, codebook, settings, clock(), get_worklist_cache(request))
    return JSONResponse(rows, headers={"Cache-Control": "no-store"})


@router.get(
    "/api/Patient/{patient_id}",
    summary="A patient's course at a glance",
    description="The inputs as series (one canonical unit per concept; the value as sent in `shown`; the source "
    "resource in `ref`), drug episodes with rates, the hourly grade of every scale on the course's grid, the "
    "current result of every scale with its deciding inputs and what is missing, the daily maximum, and the risk "
    "scores with their sources. 404 without a stored Patient.",
    response_model=dict[str, Any],
    responses=AUTH_RESPONSES,
)
async def api_patient(
    patient_id: str,
    _user: AppUserDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    codebook: CodebookDep,
    clock: ClockDep,
) -> JSONResponse:
    view = await run_in_threadpool(patient_view, session, patient_id, codebook, settings, clock())
    return JSONResponse(view, headers={"Cache-Control": "no-store"})


@router.get(
    "/api/resource/{rtype}/{rid}",
    summary="A stored input resource, for the app's links to the source of each value",
    response_model=dict[str, Any],
    responses=AUTH_RESPONSES,
)
def api_resource(rtype: str, rid: str, _user: AppUserDep, session: ReadSessionDep) -> JSONResponse:
    if rtype not in STORABLE_TYPES:
        raise FhirError.one(
            404, "not-found", f"the app shows stored inputs ({', '.join(sorted(STORABLE_TYPES))})", "rtype"
        )
    res = repository.read_resource(session, rtype, rid)
    if res is None:
        raise FhirError.one(404, "not-found", f"no such {rtype}", f"{rtype}.id")
    return JSONResponse(res, headers={"Cache-Control": "no-store"})


def mount_static(app: Any) -> None:
    """The app's scripts, styles and the vendored chart library, served by iectox itself."""
    app.mount("/app/static", StaticFiles(directory=WEB / "static"), name="app-static")
