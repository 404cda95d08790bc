"""Recording an access: the audit row, and, when the site forwards its audit trail, the FHIR
AuditEvent queued for the audit repository (`IECTOX_AUDIT_FORWARD_TARGET`) in the same
transaction, delivered by the write-back worker (at least once: a re-delivery may repeat one)."""

from __future__ import annotations

from sqlmodel import Session

from ..config.settings import Settings
from ..fhir.audit import audit_event_resource
from ..storage import outbox, repository
from ..storage.models import AuditEvent


def record_access(session: Session, event: AuditEvent, settings: Settings) -> None:
    repository.add_audit_event(session, event)
    target = settings.audit_forward_target
    if target is None:
        return
    session.flush()  # the row's id names the AuditEvent
    resource = audit_event_resource(
        row_id=event.id or 0,
        recorded=event.recorded,
        actor=event.actor,
        action=event.action,
        route=event.route,
        resource_type=event.resource_type,
        resource_id=event.resource_id,
        patient_id=event.patient_id,
        status=event.status,
        observer=f"iectox ({settings.canonical_base})",
    )
    resource.pop("id")  # the repository assigns its own
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": resource, "request": {"method": "POST", "url": "AuditEvent"}}],
    }
    outbox.enqueue(session, event.patient_id or "", target, bundle, event.recorded)
