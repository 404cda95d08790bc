"""Authentication and SMART scope checks for /fhir (Annotated dependencies), and the CDS client.

Routes declare what they need with `requires(READ | WRITE, "Type", ...)`; routes that need the
caller itself take `PrincipalDep`. GET /fhir/metadata, /healthz and /readyz stay open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from ..config.clock import utc_now
from ..config.settings import Settings
from ..fhir.errors import operation_outcome
from ..fhir.ingest import is_resource_type
from ..security.bearer import verify_access_token
from ..security.cds import CdsClient, verify_cds_jwt
from ..security.config import DEV, SecurityConfig, is_loopback, load_security
from ..security.errors import AuthError, unauthorized
from ..security.jwks import Fetch, http_fetch
from ..security.scopes import DEV as DEV_PRINCIPAL
from ..security.scopes import READ, Access, Principal
from .audit import AuditTrail
from .deps import SessionDep, SettingsDep
from .responses import FhirResponse
from .schemas import FHIR_JSON, OperationOutcome

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT",
    description="A JWT access token from the configured issuer (SMART Backend Services), with SMART v1 or v2 "
    "scopes at system/ or user/ level: read (read, r, s) on the resource type for reads and searches, write "
    "(write, c, u) for stores. See docs/security.md for the scope each operation needs.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def get_security(request: Request) -> SecurityConfig:
    security: SecurityConfig = request.app.state.security
    return security


SecurityDep = Annotated[SecurityConfig, Depends(get_security)]


def _token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        if "authorization" in request.headers:
            raise unauthorized("the Authorization header must be 'Bearer <token>'", "malformed token")
        raise unauthorized("a bearer token is required (Authorization: Bearer <JWT>)", "missing")
    return credentials.credentials


def caller(
    request: Request,
    security: SecurityConfig,
    credentials: HTTPAuthorizationCredentials | None,
    verify: Callable[[str], Principal],
) -> Principal:
    """ "dev" in dev mode (loopback clients only), else the principal `verify` makes of the bearer
    token (401 otherwise); kept on the request for the audit trail."""
    if security.mode == DEV:
        if request.client is None or not is_loopback(request.client.host):
            raise unauthorized("dev mode accepts loopback clients only", "dev mode loopback only")
        principal = DEV_PRINCIPAL
    else:
        principal = verify(_token(request, credentials))
    request.state.principal = principal
    return principal


def service_token(settings: Settings, security: SecurityConfig) -> Callable[[str], Principal]:
    """A token of the service's own issuer (IECTOX_AUTH_*)."""

    def verify(token: str) -> Principal:
        assert security.bearer is not None
        return verify_access_token(token, settings, security.bearer, utc_now())

    return verify


def authenticate(request: Request, settings: SettingsDep, security: SecurityDep, credentials: BearerDep) -> Principal:
    """The caller: a verified bearer token (401 otherwise), or "dev" in dev mode (loopback clients only)."""
    return caller(request, security, credentials, service_token(settings, security))


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def client_server(request: Request, principal: PrincipalDep, settings: SettingsDep) -> str:
    """Whose data the caller reads and writes: the EHR server its client is mapped to
    (IECTOX_AUTH_CLIENT_SERVERS, by the token's `iss sub`), else "" (data of API clients).
    Kept on the request for its audit row."""
    request.state.server = settings.namespace(settings.auth_client_servers.get(principal.actor))
    return str(request.state.server)


ServerDep = Annotated[str, Depends(client_server)]


def requires(access: Access, *rtypes: str) -> dict[str, Any]:
    """Route keyword arguments: a dependency that authenticates and needs `access` on every one of
    `rtypes` (403 otherwise), and the 401 / 403 responses for the OpenAPI document. With no
    types (POST /fhir) the route checks the types itself, once it has read the Bundle."""

    async def check(principal: PrincipalDep) -> None:
        principal.require(access, *rtypes)

    letters = "read, r or s" if access == READ else "write, c or u"
    what = ", ".join(rtypes) if rtypes else "every resource type in the Bundle"
    outcome = {"model": OperationOutcome, "content": {FHIR_JSON: {}}}
    return {
        "dependencies": [Depends(check)],
        "responses": {
            401: {**outcome, "description": "Missing, invalid or expired bearer token (WWW-Authenticate: Bearer)"},
            403: {
                **outcome,
                "description": f"The token's SMART scopes do not allow {access} on {what} "
                f"(a system/ or user/ scope with {letters})",
            },
        },
    }


def cds_client(
    request: Request, settings: SettingsDep, security: SecurityDep, session: SessionDep, credentials: BearerDep
) -> CdsClient:
    """For CDS Hooks routes: the verified client JWT (401 otherwise). `aud` must be the URL called,
    as seen from outside (`auth_public_base_url` + path behind a proxy)."""
    base = settings.auth_public_base_url
    url = f"{base.rstrip('/')}{request.url.path}" if base else str(request.url.replace(query=None, fragment=None))
    client = verify_cds_jwt(_token(request, credentials), url, settings, session, utc_now(), trust=security.cds)
    request.state.principal = client
    return client


CdsClientDep = Annotated[CdsClient, Depends(cds_client)]


def install_security(app: FastAPI, settings: Settings, engine: Engine, fetch: Fetch = http_fetch) -> None:
    """Check the security settings (SecurityConfigError), keep the key stores, add the audit trail
    and render AuthError as an OperationOutcome with WWW-Authenticate."""
    app.state.security = load_security(settings, fetch)
    app.add_middleware(AuditTrail, engine=engine, settings=settings)

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, exc: AuthError) -> FhirResponse:
        return FhirResponse(operation_outcome(exc.issues), status_code=exc.status, headers=exc.headers)


def bundle_types(doc: dict[str, Any]) -> list[str]:
    """The resource types a transaction / batch Bundle would store (each needs write)."""
    entries = doc.get("entry")
    if not isinstance(entries, list):
        return []
    types = {
        e["resource"].get("resourceType")
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    }
    return sorted(t for t in types if isinstance(t, str) and is_resource_type(t))
