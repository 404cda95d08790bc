"""Recording an access: the audit row, and, when the site forwards its audit trail, the FHIR
AuditEvent queued for the audit repository (`IECTOX_AUDIT_FORWARD_TARGET`) in the same
transaction, delivered by the write-back worker (at least once: a re-delivery may repeat one).

Forwarding never costs the audit row (nor the request it belongs to): it is added in a savepoint
and a failure to build it is logged by its class. Each forwarded row has its own outbox ordering
key, so audit rows never queue behind each other or behind a patient's write-backs."""

from __future__ import annotations

import logging
from typing import Any

from sqlmodel import Session

from ..config.settings import Settings
from ..fhir.audit import audit_event_resource
from ..observe.logs import current_request_id
from ..storage import outbox, repository
from ..storage.models import AuditEvent

log = logging.getLogger("iectox.audit")


def audit_event_of(event: AuditEvent, settings: Settings) -> dict[str, Any]:
    """The FHIR AuditEvent of an audit row."""
    return audit_event_resource(
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
        request_id=event.request_id,
        server_base=server.base_url if (server := settings.ehr_servers.get(event.server)) else "",
    )


def record_access(session: Session, event: AuditEvent, settings: Settings) -> None:
    event.request_id = event.request_id or current_request_id() or ""
    repository.add_audit_event(session, event)
    target = settings.audit_forward_target
    if target is None:
        return
    try:
        with session.begin_nested():
            session.flush()  # the row's id names the AuditEvent and its ordering key
            resource = audit_event_of(event, settings)
            resource.pop("id")  # the repository assigns its own
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"resource": resource, "request": {"method": "POST", "url": "AuditEvent"}}],
            }
            outbox.enqueue(session, f"audit:{event.id}", target, bundle, event.recorded, event.request_id)
    except Exception as exc:  # the audit row stands; the forwarded copy is lost, and said so
        log.error("audit forward failed: %s", type(exc).__name__)
