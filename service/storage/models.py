"""Tables. Raw FHIR JSON is kept verbatim; indexed columns serve the queries."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, DateTime, LargeBinary
from sqlmodel import Field, SQLModel


class StoredResource(SQLModel, table=True):
    """An ingested input resource (Patient, Observation, MedicationAdministration, ...)."""

    __tablename__ = "stored_resource"

    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    patient_id: str | None = Field(default=None, index=True, max_length=64)
    version_id: int = 1
    source_version: str = Field(default="", max_length=64)  # meta.versionId as sent
    source_last_updated: str = Field(default="", max_length=40)  # meta.lastUpdated as sent
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class EmittedResource(SQLModel, table=True):
    """A RiskAssessment or Provenance produced by a stored evaluation."""

    __tablename__ = "emitted_resource"

    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    patient_id: str = Field(index=True, max_length=64)
    method: str | None = Field(default=None, index=True, max_length=64)
    code: str | None = Field(default=None, max_length=64)
    occurrence: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    version_id: int = 1
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
