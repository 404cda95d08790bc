"""Subscription notifications (classic R4 rest-hook and the subscriptions backport IG)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

from ..ehr.client import FhirClient
from ..ehr.errors import EhrError
from ..ehr.notifications import EVENT, parse_notification, patient_of, split_reference
from ..ehr.poll import sync_patients
from ..fhir.errors import FhirError, Issue, operation_outcome
from ..fhir.ingest import load_json
from ..security.scopes import WRITE
from .auth import requires
from .deps import ClockDep, CodebookDep, EngineDep, SettingsDep
from .responses import FhirResponse
from .schemas import ERRORS, FhirResource

router = APIRouter(prefix="/fhir", tags=["Subscriptions"], default_response_class=FhirResponse, responses=ERRORS)
log = logging.getLogger("iectox.subscriptions")


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
    target = settings.subscription_target
    server = settings.ehr_servers.get(target)
    if server is None:
        raise FhirError.one(503, "transient", f"no EHR server {target!r} configured (IECTOX_EHR_SERVERS)")
    try:
        async with FhirClient(server) as client:
            for ref in note.focus:
                target_ref = split_reference(ref)
                res = await client.read(*target_ref) if target_ref else None
                pid = patient_of(res) if res else None
                if pid:
                    note.patient_ids.add(pid)
            new = await sync_patients(client, engine, target, note.patient_ids, codebook, settings, clock)
    except (EhrError, ValueError) as exc:
        log.warning("notification: EHR read failed (%s)", type(exc).__name__)
        raise FhirError.one(503, "transient", "the EHR could not be read; retry later") from None
    log.info("notification: %d events, %d patients, %d new evaluations", note.events, len(note.patient_ids), new)
    return _ok(f"{len(note.patient_ids)} patients synchronised, {new} new evaluations")
