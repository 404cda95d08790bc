"""CDS Hooks 2.0 request and response models (the fields this service reads and writes)."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class RawPrefetch:
    """A hook's prefetch as the EHR sent it: the JSON text of an object, not parsed yet
    (api/orjson_route.py sets it aside; HookRequest.prefetch is then None)."""

    text: bytes


class CdsResponse(BaseModel):
    cards: list[dict[str, Any]]
    systemActions: list[dict[str, Any]] = Field(default_factory=list)
