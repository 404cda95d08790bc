"""Loose FHIR shapes for the OpenAPI document (the wire format is FHIR R4 JSON)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FhirResource(BaseModel):
    """Any FHIR R4 resource (JSON). Validated by the service, not by this schema."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {"resourceType": "Observation"}})
    resourceType: str = Field(description="FHIR resource type")
    id: str | None = None


class FhirBundle(FhirResource):
    """A FHIR R4 Bundle."""

    type: str = Field(description="collection, batch, transaction, searchset, ...")
    entry: list[dict[str, Any]] | None = None


class OperationOutcomeIssue(BaseModel):
    severity: str
    code: str
    diagnostics: str | None = None
    expression: list[str] | None = Field(default=None, description="FHIRPath of the problem")


class OperationOutcome(BaseModel):
    """FHIR OperationOutcome: every error response of this API."""

    resourceType: str = "OperationOutcome"
    issue: list[OperationOutcomeIssue]


FHIR_JSON = "application/fhir+json"
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OperationOutcome, "description": text, "content": {FHIR_JSON: {}}}
    for status, text in {
        400: "Malformed request (JSON, parameters)",
        404: "Not found",
        413: "Body or Bundle over the configured limit",
        422: "Invalid FHIR content; the OperationOutcome names each problem and its FHIRPath",
    }.items()
}


def fhir_body(model: type[BaseModel], description: str) -> dict[str, Any]:
    """openapi_extra for a raw FHIR JSON request body."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {FHIR_JSON: {"schema": ref}, "application/json": {"schema": ref}},
        }
    }
