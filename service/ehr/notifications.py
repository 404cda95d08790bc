"""Subscription notifications, classic R4 rest-hook and topic-based (subscriptions backport IG).

Pure: a parsed JSON body in, what to do out. A notification is only a hint that a patient's
data changed; the service then reads the patient from the EHR (so a lost, repeated or
out-of-order notification changes nothing that the reconciliation poll would not also see).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..fhir.errors import FhirError

HANDSHAKE, HEARTBEAT, EVENT = "handshake", "heartbeat", "event-notification"
STATUS_TYPES = ("Parameters", "SubscriptionStatus")


@dataclass
class Notification:
    kind: str  # handshake | heartbeat | event-notification | query-status | query-event
    patient_ids: set[str] = field(default_factory=set)
    focus: list[str] = field(default_factory=list)  # references to read to find the patient
    events: int = 0


def _ref_id(ref: Any, rtype: str) -> str | None:
    if not isinstance(ref, str):
        return None
    parts = ref.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == rtype and parts[-1]:
        return parts[-1]
    return None


def patient_of(res: dict[str, Any]) -> str | None:
    if res.get("resourceType") == "Patient":
        rid = res.get("id")
        return rid if isinstance(rid, str) else None
    for key in ("subject", "patient"):
        ref = res.get(key)
        if isinstance(ref, dict):
            pid = _ref_id(ref.get("reference"), "Patient")
            if pid:
                return pid
    return None


def _status_kind(status: dict[str, Any]) -> tuple[str, list[str]]:
    """(type, focus references) of a backport SubscriptionStatus (as Parameters or R4B/R5 resource)."""
    if status.get("resourceType") == "SubscriptionStatus":
        focus = [
            e.get("focus", {}).get("reference")
            for e in status.get("notificationEvent") or ()
            if isinstance(e, dict) and isinstance(e.get("focus"), dict)
        ]
        return str(status.get("type") or ""), [f for f in focus if isinstance(f, str)]
    kind, focus = "", []
    for p in status.get("parameter") or ():
        if not isinstance(p, dict):
            continue
        if p.get("name") == "type":
            kind = str(p.get("valueCode") or "")
        elif p.get("name") == "notification-event":
            for part in p.get("part") or ():
                if isinstance(part, dict) and part.get("name") == "focus":
                    ref = (part.get("valueReference") or {}).get("reference")
                    if isinstance(ref, str):
                        focus.append(ref)
    return kind, focus


def parse_notification(doc: Any) -> Notification:
    """A rest-hook body: a backport notification Bundle, a Bundle of changed resources, or one resource."""
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
        raise FhirError.one(400, "structure", "a notification is a FHIR resource or Bundle", "resourceType")
    if doc["resourceType"] != "Bundle":
        pid = patient_of(doc)
        return Notification(EVENT, {pid} if pid else set(), [], 1)
    resources = [
        e["resource"] for e in doc.get("entry") or () if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]
    if resources and resources[0].get("resourceType") in STATUS_TYPES:
        kind, focus = _status_kind(resources[0])
        if not kind:
            raise FhirError.one(400, "required", "the SubscriptionStatus has no type", "Bundle.entry[0].resource")
        out = Notification(kind, events=len(focus))
        for res in resources[1:]:  # full-resource payloads, when the subscription asks for them
            pid = patient_of(res)
            if pid:
                out.patient_ids.add(pid)
        for ref in focus:
            pid = _ref_id(ref, "Patient")
            if pid:
                out.patient_ids.add(pid)
            elif not any(ref.endswith(f"{r.get('resourceType')}/{r.get('id')}") for r in resources[1:]):
                out.focus.append(ref)
        return out
    out = Notification(EVENT, events=len(resources))
    for res in resources:
        pid = patient_of(res)
        if pid:
            out.patient_ids.add(pid)
    return out
