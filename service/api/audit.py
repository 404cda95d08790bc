"""The audit trail: one `audit_event` row for every request that reaches a /fhir route or the
clinician app's data (/app/api), and for every CDS hook call that is rejected (an answered hook
records its own row, with the patient).

Written after the request has finished (its own session and transaction, so it survives a
rolled-back request and never waits on the request's own database lock). The application log
stays free of patient identifiers; they belong here only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..app.audit import record_access
from ..config.clock import utc_now
from ..config.settings import Settings
from ..security.scopes import ANONYMOUS
from ..storage.models import AuditEvent

log = logging.getLogger("iectox.audit")

PREFIX = "/fhir"
# public, no patient data
NOT_AUDITED = frozenset({"/fhir/metadata", "/fhir/CodeSystem/{cs_id}", "/fhir/OperationDefinition/{op_id}"})
CDS_HOOK = "/cds-services/{service_id}"
APP_API = "/app/api/"  # the clinician app's data: every view of a patient is an access


def _app_event(
    template: str, params: dict[str, str], actor: str, server: str, status: int, now: datetime
) -> AuditEvent:
    """An app view: the worklist (every patient: a search), a patient's course, or one resource."""
    rtype, rid = params.get("rtype"), params.get("rid")
    if "patient_id" in params:
        rtype, rid = "Patient", params["patient_id"]
    patient = rid if rtype == "Patient" else None  # else the stored resource's patient (add_audit_event)
    return AuditEvent(
        recorded=now,
        actor=actor,
        action="app-search" if template.endswith("/worklist") else "app-view",
        route=template[:128],
        resource_type=_cut(rtype, 64),
        resource_id=_cut(rid, 64),
        patient_id=_cut(patient, 64),
        status=status,
        server=server,
    )


def _cut(value: object, n: int) -> str | None:
    return None if value is None else str(value)[:n]


def audit_event(
    scope: Scope, status: int, location: str | None, now: datetime, settings: Settings
) -> AuditEvent | None:
    """The row for a finished request, or None when it did not reach an audited route."""
    template = getattr(scope.get("route"), "path", None)
    method = scope.get("method", "")
    params = scope.get("path_params") or {}
    state = scope.get("state") or {}
    principal = state.get("principal")
    actor = str(getattr(principal, "actor", "") or ANONYMOUS)[:256]
    # whose data: as the route's server dependency found it, else the namespace of the caller's
    # mapped EHR server (a CDS client is mapped by its issuer)
    mapped = settings.auth_client_servers.get(getattr(principal, "iss", None) or actor)
    server = str(state.get("server", settings.namespace(mapped)))
    if template == CDS_HOOK and method == "POST":
        if status < 400:
            return None  # recorded by the hook itself (service/cdshooks/service.py), with its patient
        route = f"/cds-services/{params.get('service_id', '')}"[:128]
        return AuditEvent(recorded=now, actor=actor, action="hook", route=route, status=status, server=server)
    if isinstance(template, str) and template.startswith(APP_API):
        return _app_event(template, params, actor, server, status, now)
    if not isinstance(template, str) or not template.startswith(PREFIX) or template in NOT_AUDITED:
        return None
    parts = template.removeprefix(PREFIX).strip("/").split("/")
    rtype = parts[0] if parts[0][:1].isupper() else None
    rid = params.get(parts[1].strip("{}")) if len(parts) > 1 and parts[1].startswith("{") else None
    operation = parts[-1] if parts[-1].startswith("$") else None
    if operation:
        action = operation[1:]
    elif template == PREFIX:
        action = "transaction"
    elif method == "GET":
        action = "read" if rid else "search"
    else:
        action = {"POST": "create", "PUT": "update"}.get(method, method.lower())
    if rid is None and location and action == "create" and location.startswith(f"{rtype}/"):
        rid = location.split("/")[1]  # the id the server gave (Location: Type/id/_history/n)
    patient = params.get("patient_id")
    if action == "search" and rtype in ("RiskAssessment", "AuditEvent"):  # a search of one patient's data
        query = QueryParams(scope.get("query_string", b""))
        subject = query.get("subject" if rtype == "RiskAssessment" else "patient")
        patient = subject.removeprefix("Patient/") if subject else None
    return AuditEvent(
        recorded=now,
        actor=actor,
        action=action[:32],
        route=template[:128],
        resource_type=_cut(rtype, 64),
        resource_id=_cut(rid, 64),
        patient_id=_cut(patient, 64),
        status=status,
        server=server,
    )


class AuditTrail:
    """ASGI middleware writing `audit_event` rows (see audit_event)."""

    def __init__(
        self, app: ASGIApp, engine: Engine, settings: Settings, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.app, self.engine, self.settings, self.clock = app, engine, settings, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith((PREFIX, "/cds-services/", APP_API)):
            await self.app(scope, receive, send)
            return
        status, location = 0, None

        async def watch(message: Message) -> None:
            nonlocal status, location
            if message["type"] == "http.response.start":
                status = message["status"]
                location = next((v.decode("latin-1") for k, v in message.get("headers", ()) if k == b"location"), None)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            await self._record(scope, status or 500, location)
            raise
        await self._record(scope, status, location)

    async def _record(self, scope: Scope, status: int, location: str | None) -> None:
        event = audit_event(scope, status, location, self.clock(), self.settings)
        if event is None:
            return
        try:
            await run_in_threadpool(self._write, event)
        except Exception as exc:  # the response is already out; never the event's content in the log
            log.error("audit write failed: %s", type(exc).__name__)

    def _write(self, event: AuditEvent) -> None:
        with Session(self.engine) as session:
            record_access(session, event, self.settings)
            session.commit()
