"""Subscription notifications, classic R4 rest-hook and topic-based (subscriptions backport IG).

Pure: a parsed JSON body in, what to do out. A notification is only a hint that a patient's
data changed; the service then reads the patient from the EHR (so a lost, repeated or
out-of-order notification changes nothing that the reconciliation poll would not also see).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..fhir.errors import FhirError

HANDSHAKE, HEARTBEAT, EVENT = "handshake", "heartbeat", "event-notification"
STATUS_TYPES = ("Parameters", "SubscriptionStatus")
# [base/]Type/id[/_history/version]: what a focus reference must look like to be read.
_REFERENCE = re.compile(r"^(?:.*/)?([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


def split_reference(ref: str) -> tuple[str, str] | None:
    """(type, id) of a literal reference, relative or absolute; None if it is not one."""
    m = _REFERENCE.match(ref)
    return (m.group(1), m.group(2)) if m else None


@dataclass
class Notification:
    kind: str  # handshake | heartbeat | event-notification | query-status | query-event
    patient_ids: set[str] = field(default_factory=set)
    focus: list[str] = field(default_factory=list)  # references to read to find the patient
    events: int = 0


def _ref_id(ref: Any, rtype: str) -> str | None:
    found = split_reference(ref) if isinstance(ref, str) else None
    return found[1] if found is not None and found[0] == rtype else None


def patient_of(res: dict[str, Any]) -> str | None:
    if res.get("resourceType") == "Patient":
        return _ref_id(f"Patient/{res.get('id')}", "Patient")
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
        events = status.get("notificationEvent")
        focus = [_reference(e.get("focus")) for e in _list(events) if isinstance(e, dict)]
        kind = status.get("type")
        return (kind if isinstance(kind, str) else ""), [f for f in focus if f is not None]
    kind, found = "", []
    for p in _list(status.get("parameter")):
        if not isinstance(p, dict):
            continue
        if p.get("name") == "type":
            code = p.get("valueCode")
            kind = code if isinstance(code, str) else ""
        elif p.get("name") == "notification-event":
            for part in _list(p.get("part")):
                if isinstance(part, dict) and part.get("name") == "focus":
                    ref = _reference(part.get("valueReference"))
                    if ref is not None:
                        found.append(ref)
    return kind, found


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _reference(value: Any) -> str | None:
    """The reference string of a Reference element; 400 when it is there but not a literal reference."""
    if not isinstance(value, dict) or value.get("reference") is None:
        return None
    ref = value["reference"]
    if not isinstance(ref, str) or split_reference(ref) is None:
        raise FhirError.one(400, "value", "a notification focus is not a literal reference (Type/id)", "focus")
    return ref


def parse_notification(doc: Any) -> Notification:
    """A rest-hook body: a backport notification Bundle, a Bundle of changed resources, or one resource."""
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
        raise FhirError.one(400, "structure", "a notification is a FHIR resource or Bundle", "resourceType")
    if doc["resourceType"] != "Bundle":
        pid = patient_of(doc)
        return Notification(EVENT, {pid} if pid else set(), [], 1)
    resources = [
        e["resource"] for e in _list(doc.get("entry")) if isinstance(e, dict) and isinstance(e.get("resource"), dict)
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
