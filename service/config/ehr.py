"""EHR FHIR server configuration: one entry of ``Settings.ehr_servers`` (env IECTOX_EHR_SERVERS).

A leaf: the EHR client (``service.ehr``) reads it; nothing here talks to a server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

# SMART v2 scopes (<context>/<Type>.<subset of "cruds" in that order>). Servers that only know
# SMART v1 need e.g. "system/Observation.read system/RiskAssessment.write".
DEFAULT_SCOPE = (
    "system/Patient.rs system/Observation.rs system/MedicationAdministration.rs system/Medication.rs "
    "system/Condition.rs system/Procedure.rs system/RiskAssessment.cu system/Provenance.cu"
)


class FhirServerConfig(BaseModel):
    """One EHR FHIR server (an entry of ``Settings.ehr_servers``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str
    # SMART Backend Services: client_id and a key (PEM file, or inline PEM) turn auth on.
    client_id: str | None = None
    private_key_path: Path | None = None
    private_key: SecretStr | None = None
    key_id: str | None = None  # the JWT `kid` header (the key's id in the registered JWKS)
    alg: Literal["RS384", "ES384"] = "RS384"
    scope: str = DEFAULT_SCOPE
    # Skip discovery ({base_url}/.well-known/smart-configuration) when set.
    token_url: str | None = None

    timeout_s: float = Field(default=15.0, gt=0, le=600)  # read/write/pool timeout per attempt
    connect_timeout_s: float = Field(default=5.0, gt=0, le=600)
    max_retries: int = Field(default=3, ge=0, le=20)  # retries after the first attempt
    backoff_base_s: float = Field(default=0.5, ge=0, le=3600)
    backoff_max_s: float = Field(default=30.0, ge=0, le=3600)
    retry_after_max_s: float = Field(default=120.0, ge=0, le=24 * 3600)

    # Searches without _count ask for this page size; paging stops with an error past max_pages.
    page_size: int | None = Field(default=200, ge=1, le=10_000)
    max_pages: int = Field(default=1000, ge=1)
    # A search whose query string is longer is sent as POST {type}/_search (form-encoded).
    max_get_query_chars: int = Field(default=1800, ge=100)

    @field_validator("base_url", "token_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip().rstrip("/")
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("must be an absolute http(s) URL without query or fragment")
        return v

    @model_validator(mode="after")
    def _smart_pair(self) -> Self:
        has_key = self.private_key_path is not None or self.private_key is not None
        if (self.client_id is None) != (not has_key):
            raise ValueError("SMART needs both client_id and private_key_path (or private_key), or neither")
        if self.private_key_path is not None and self.private_key is not None:
            raise ValueError("give private_key_path or private_key, not both")
        return self

    @property
    def smart(self) -> bool:
        """True when calls are authorised with SMART Backend Services."""
        return self.client_id is not None
