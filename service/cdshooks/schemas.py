"""CDS Hooks 2.0 request and response models (the fields this service reads and writes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FhirAuthorization(BaseModel):
    access_token: str
    token_type: str = "Bearer"  # noqa: S105 (the token type name, not a secret)
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None


class HookRequest(BaseModel):
    """CDS Hooks 2.0 HookRequest (the fields this service reads)."""

    model_config = ConfigDict(extra="allow")

    hook: str
    hookInstance: str
    context: dict[str, Any]
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    prefetch: dict[str, Any] | None = Field(default=None)


class CdsResponse(BaseModel):
    cards: list[dict[str, Any]]
    systemActions: list[dict[str, Any]] = Field(default_factory=list)
