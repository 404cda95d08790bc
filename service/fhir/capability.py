"""The CapabilityStatement served at GET /fhir/metadata."""

from __future__ import annotations

from typing import Any

from .. import __version__

_INPUTS = ("Observation", "MedicationAdministration", "Patient", "Procedure")


def capability_statement(base: str) -> dict[str, Any]:
    resources: list[dict[str, Any]] = [
        {
            "type": t,
            "interaction": [{"code": "read"}, {"code": "create"}, {"code": "update"}],
            "versioning": "versioned",
        }
        for t in _INPUTS
    ]
    resources.append(
        {
            "type": "RiskAssessment",
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [
                {"name": "subject", "type": "reference"},
                {"name": "method", "type": "token"},
                {"name": "_sort", "type": "string", "documentation": "date or -date"},
            ],
        }
    )
    resources[2]["operation"] = [
        {"name": "evaluate", "definition": f"{base}/OperationDefinition/Patient-evaluate"},
        {"name": "course", "definition": f"{base}/OperationDefinition/Patient-course"},
    ]
    resources.append(
        {
            "type": "AuditEvent",
            "interaction": [{"code": "search-type"}],
            "searchParam": [{"name": "patient", "type": "reference"}, {"name": "date", "type": "date"}],
        }
    )
    resources += [{"type": t, "interaction": [{"code": "read"}]} for t in ("CodeSystem", "OperationDefinition")]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-21",
        "kind": "instance",
        "software": {"name": "iectox", "version": __version__},
        "implementation": {"description": "iectox: ASTCT 2019 CRS and ICANS grading over FHIR R4"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                    "display": "SMART-on-FHIR",
                                }
                            ],
                            "text": "OAuth 2.0 bearer tokens with SMART scopes",
                        }
                    ],
                    "description": "Bearer JWTs from the configured issuer (SMART Backend Services) with system/ or "
                    "user/ scopes (v1 or v2), read or write per resource type; AuditEvent has its own scope. The "
                    "clinician app uses the EHR's SMART App Launch tokens. CDS Hooks calls carry a CDS client JWT. "
                    "Open: this CapabilityStatement, CodeSystems and OperationDefinitions. docs/security.md.",
                },
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "operation": [
                    {"name": "evaluate", "definition": f"{base}/OperationDefinition/evaluate"},
                    {"name": "export", "definition": f"{base}/OperationDefinition/export"},
                ],
            }
        ],
    }
