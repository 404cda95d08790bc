"""The audit trail as FHIR AuditEvent resources, in the pattern of IHE Basic Audit Log Patterns
(BALP, https://profiles.ihe.net/ITI/BALP/): what was done (type `rest` with the RESTful
interaction as subtype, or an operation), by whom (the client or user, as the requestor agent),
about which patient and resource (entities), with what outcome, observed by iectox.

Built from the private `audit_event` table, which stays the store; validated before it leaves.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.auditevent import AuditEvent as AuditEventModel

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
OBJECT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OWN_TYPES = frozenset({"RiskAssessment", "Provenance", "AuditEvent"})  # this service's: never on an EHR's base
SECURITY_SOURCE = "http://terminology.hl7.org/CodeSystem/security-source-type"
BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"

# audit_event.action -> (RESTful interaction, AuditEvent.action C/R/U/D/E)
ACTIONS: dict[str, tuple[str, str]] = {
    "read": ("read", "R"),
    "search": ("search-type", "E"),
    "create": ("create", "C"),
    "update": ("update", "U"),
    "transaction": ("transaction", "E"),
    "app-view": ("read", "R"),
    "app-search": ("search-system", "E"),
}


def _outcome(status: int) -> str:
    """0 success, 4 minor failure (the request's: 4xx), 8 serious failure (the server's: 5xx)."""
    return "0" if status < 400 else "4" if status < 500 else "8"


def _utc(t: datetime) -> str:
    return (t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)).isoformat()


def audit_event_resource(
    *,
    row_id: int,
    recorded: datetime,
    actor: str,
    action: str,
    route: str,
    resource_type: str | None,
    resource_id: str | None,
    patient_id: str | None,
    status: int,
    observer: str,
    request_id: str = "",
    server_base: str = "",
) -> dict[str, Any]:
    """One AuditEvent of an access; `observer`: this service's name (the source); `request_id`:
    the request's X-Request-ID (a transaction entity, as BALP records it); `server_base`: the FHIR
    base of the EHR whose patient and inputs these are (their references are absolute on it: two
    EHRs' Patient/123 are two patients), "" for data sent to this service."""
    interaction, code = ACTIONS.get(action, ("operation", "E"))
    ehr = f"{server_base.rstrip('/')}/" if server_base else ""
    entities: list[dict[str, Any]] = []
    if patient_id:
        entities.append(
            {
                "what": {"reference": f"{ehr}Patient/{patient_id}"},
                "type": {"system": OBJECT_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    if resource_type and resource_id and not (resource_type == "Patient" and resource_id == patient_id):
        on = "" if resource_type in OWN_TYPES else ehr
        entities.append(
            {
                "what": {"reference": f"{on}{resource_type}/{resource_id}"},
                "type": {"system": OBJECT_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
            }
        )
    entities.append({"type": {"system": OBJECT_TYPE, "code": "2"}, "name": "route", "description": route})
    if request_id:
        entities.append(
            {
                "what": {"identifier": {"value": request_id}},
                "type": {"system": BALP_ENTITY, "code": "XrequestId", "display": "X-Request-Id"},
            }
        )
    res: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row_id),
        "type": {"system": AUDIT_TYPE, "code": "rest", "display": "Restful Operation"},
        "subtype": [{"system": INTERACTION, "code": interaction, "display": action}],
        "action": code,
        "recorded": _utc(recorded),
        "outcome": _outcome(status),
        "outcomeDesc": f"HTTP {status}",
        "agent": [
            {
                "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
                "who": {"display": actor},
                "requestor": True,
            },
            {  # BALP: the server that answered
                "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
                "who": {"display": observer},
                "requestor": False,
            },
        ],
        "source": {
            "observer": {"display": observer},
            "type": [{"system": SECURITY_SOURCE, "code": "4", "display": "Application Server"}],
        },
        "entity": entities,
    }
    AuditEventModel.model_validate(res)
    return res
