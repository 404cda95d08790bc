"""The clinician app (/app/): its pages, its scripts (served here: no CDN), its configuration
and the JSON it reads. Parse, call, respond: what the pages show is built in app/view.py.

The pages are static shells; the data come from /app/api/*, which needs a bearer token: the
access token the EHR issued to the app at its SMART launch (or a token of the service's own
issuer), with user/ (or system/) read scopes on Patient, Observation, MedicationAdministration
and RiskAssessment. In dev mode (loopback only) no token is needed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..app.view import WorklistCache, patient_view, worklist
from ..config.clock import utc_now
from ..config.settings import Settings
from ..fhir.errors import FhirError
from ..fhir.ingest import STORABLE_TYPES
from ..security.bearer import verify_app_token
from ..security.config import DEV
from ..security.jws import audience_matches, peek
from ..security.scopes import READ, Principal
from ..storage import repository
from .auth import BearerDep, SecurityDep, caller, requires, service_token
from .deps import ClockDep, CodebookDep, ReadSessionDep, SettingsDep

WEB = Path(__file__).resolve().parent.parent / "web"
# What the pages show is read from all of these (Conditions feed the scores, Procedures the events).
READ_TYPES = ("Patient", "Observation", "MedicationAdministration", "Condition", "Procedure", "RiskAssessment")


def page_headers(settings: Settings) -> dict[str, str]:
    """The pages load only what iectox serves (hospital networks block CDNs) and talk only to
    iectox and, for the SMART launch, the configured EHR (its FHIR base, token issuer and keys)."""
    origins = sorted(
        {
            f"{parts.scheme}://{parts.netloc}"
            for url in (settings.app_fhir_base, settings.app_issuer, settings.app_jwks_url)
            if url and (parts := urlsplit(url)).scheme in ("http", "https")
        }
    )
    connect = " ".join(["'self'", *origins])
    return {
        "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; object-src 'none'; base-uri 'none'; form-action 'self'",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


router = APIRouter(prefix="/app", tags=["Clinician app"])


def app_user(request: Request, settings: SettingsDep, security: SecurityDep, credentials: BearerDep) -> Principal:
    """The app's user: the EHR's access token from the SMART launch (when the clinician app is
    configured: its issuer, for the EHR's FHIR base) or a token of the service's issuer; "dev" in
    dev mode, loopback clients only. 403 unless its scopes allow reading what the pages show."""
    service = service_token(settings, security)

    def verify(token: str) -> Principal:
        _, claims = peek(token)  # which verifier: each checks issuer, audience and signature itself
        ours = security.app is not None and claims.get("iss") == settings.app_issuer
        if ours and audience_matches(claims, settings.app_fhir_base or ""):
            assert security.app is not None
            principal = verify_app_token(token, settings, security.app, utc_now())
            # whose patients: the EHR that launched the app (the server at IECTOX_APP_FHIR_BASE)
            request.state.server = settings.server_at(settings.app_fhir_base)
            return principal
        principal = service(token)
        request.state.server = settings.namespace(settings.auth_client_servers.get(principal.actor))
        return principal

    principal = caller(request, security, credentials, verify)
    principal.require(READ, *READ_TYPES)
    return principal


AppUserDep = Annotated[Principal, Depends(app_user)]


def app_server(request: Request, _user: AppUserDep) -> str:
    """Whose patients the user sees, as the verifier that accepted the token found it (`app_user`,
    kept on the request for its audit row too): for a token of the EHR that launched the app, the
    namespace of the server at IECTOX_APP_FHIR_BASE; for a token of the service's issuer, its
    client's mapped server (IECTOX_AUTH_CLIENT_SERVERS); the home namespace "" in dev mode."""
    return str(getattr(request.state, "server", ""))


AppServerDep = Annotated[str, Depends(app_server)]
# 401 / 403 in the OpenAPI document, as the /fhir routes declare them
AUTH_RESPONSES = requires(READ, *READ_TYPES)["responses"]


def get_worklist_cache(request: Request) -> WorklistCache:
    cache: WorklistCache = request.app.state.worklist
    return cache


def _page(name: str, settings: Settings) -> FileResponse:
    return FileResponse(WEB / name, media_type="text/html; charset=utf-8", headers=page_headers(settings))


@router.get("/", include_in_schema=False)
def worklist_page(settings: SettingsDep) -> FileResponse:
    return _page("worklist.html", settings)


@router.get("/Patient/{patient_id}", include_in_schema=False)
def patient_page(patient_id: str, settings: SettingsDep) -> FileResponse:  # the page reads the id from its URL
    return _page("patient.html", settings)


@router.get("/launch", include_in_schema=False)
def launch_page(settings: SettingsDep) -> FileResponse:
    return _page("launch.html", settings)


@router.get("/callback", include_in_schema=False)
def callback_page(settings: SettingsDep) -> FileResponse:
    return _page("callback.html", settings)


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
    server: AppServerDep,
    request: Request,
    session: ReadSessionDep,
    settings: SettingsDep,
    codebook: CodebookDep,
    clock: ClockDep,
) -> JSONResponse:
    cache = get_worklist_cache(request)
    rows = await run_in_threadpool(partial(worklist, server=server), session, codebook, settings, clock(), cache)
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
    server: AppServerDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    codebook: CodebookDep,
    clock: ClockDep,
) -> JSONResponse:
    view = await run_in_threadpool(
        partial(patient_view, server=server), session, patient_id, codebook, settings, clock()
    )
    return JSONResponse(view, headers={"Cache-Control": "no-store"})


@router.get(
    "/api/resource/{rtype}/{rid}",
    summary="A stored input resource, for the app's links to the source of each value",
    response_model=dict[str, Any],
    responses=AUTH_RESPONSES,
)
def api_resource(rtype: str, rid: str, user: AppUserDep, server: AppServerDep, session: ReadSessionDep) -> JSONResponse:
    if rtype not in STORABLE_TYPES:
        raise FhirError.one(
            404, "not-found", f"the app shows stored inputs ({', '.join(sorted(STORABLE_TYPES))})", "rtype"
        )
    user.require(READ, rtype)  # a Medication, say, needs its own scope
    res = repository.read_resource(session, rtype, rid, server=server)
    if res is None:
        raise FhirError.one(404, "not-found", f"no such {rtype}", f"{rtype}.id")
    return JSONResponse(res, headers={"Cache-Control": "no-store"})


def mount_static(app: Any) -> None:
    """The app's scripts, styles and the vendored chart library, served by iectox itself."""
    app.mount("/app/static", StaticFiles(directory=WEB / "static"), name="app-static")
