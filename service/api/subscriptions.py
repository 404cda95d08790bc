"""Subscription notifications (classic R4 rest-hook and the subscriptions backport IG)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..ehr.notifications import EVENT, parse_notification
from ..ehr.sync import sync_notification
from ..fhir.errors import Issue, operation_outcome
from ..fhir.ingest import load_json
from ..security.scopes import WRITE
from .auth import requires
from .deps import ClockDep, CodebookDep, EngineDep, SettingsDep
from .responses import FhirResponse
from .schemas import ERRORS, FhirResource

router = APIRouter(prefix="/fhir", tags=["Subscriptions"], default_response_class=FhirResponse, responses=ERRORS)


def _ok(text: str) -> FhirResponse:
    return FhirResponse(operation_outcome([Issue("informational", text, None, "information")]))


@router.post(
    "/$subscription-notification",
    summary="Receive a subscription notification (rest-hook)",
    description="Accepts a classic R4 rest-hook post (an empty body, one resource, or a Bundle of changed "
    "resources) and a topic-based backport notification Bundle (type history, a SubscriptionStatus Parameters "
    "first). Handshakes and heartbeats are acknowledged; for an event the patient is read from the EHR "
    "(`IECTOX_SUBSCRIPTION_TARGET`), stored, evaluated and written back. Idempotent: a repeated or out-of-order "
    "notification changes nothing. 503 when the EHR cannot be read (the sender retries; the poll catches up).",
    response_model=FhirResource,
    **requires(WRITE, "Observation"),
)
async def notification(
    request: Request, settings: SettingsDep, codebook: CodebookDep, engine: EngineDep, clock: ClockDep
) -> FhirResponse:
    body = await request.body()
    if not body.strip():
        return _ok("ping acknowledged")  # a classic rest-hook without payload
    note = parse_notification(load_json(body))
    if note.kind != EVENT:
        return _ok(f"{note.kind} acknowledged")
    synced = await sync_notification(note, engine, codebook, settings, clock)
    return _ok(f"{synced.patients} patients synchronised, {synced.new} new evaluations")
