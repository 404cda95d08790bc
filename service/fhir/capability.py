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
    resources[2]["operation"] = [{"name": "evaluate", "definition": f"{base}/OperationDefinition/Patient-evaluate"}]
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
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "operation": [{"name": "evaluate", "definition": f"{base}/OperationDefinition/evaluate"}],
            }
        ],
    }
