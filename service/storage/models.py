"""Tables. Raw FHIR JSON is kept verbatim; indexed columns serve the queries."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, DateTime, Index, LargeBinary, text
from sqlmodel import Field, SQLModel


def utc(t: datetime) -> datetime:
    """Datetimes read back from SQLite are naive: they were written in UTC."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class StoredResource(SQLModel, table=True):
    """An ingested input resource (Patient, Observation, MedicationAdministration, ...)."""

    __tablename__ = "stored_resource"
    # a patient's inputs are read by (server, patient): one index, not a scan of the namespace
    __table_args__ = (Index("ix_stored_resource_server_patient_id", "server", "patient_id"),)

    # The EHR server it came from (a name of IECTOX_EHR_SERVERS; "" = sent to this service by an
    # API client): two servers' Patient/123 are two patients and never meet.
    server: str = Field(default="", primary_key=True, max_length=64)
    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    patient_id: str | None = Field(default=None, max_length=64)
    version_id: int = 1
    source_version: str = Field(default="", max_length=64)  # meta.versionId as sent
    source_last_updated: str = Field(default="", max_length=40)  # meta.lastUpdated as sent
    # The version order as numbers (the app layer computes them), so that the upsert compares
    # versions in SQL: (version_number, source_version, updated_us).
    version_number: int = Field(  # meta.versionId as a number; -1 when not one
        default=-1, sa_column=Column(BigInteger, nullable=False, server_default=text("-1"))
    )
    updated_us: int = Field(  # meta.lastUpdated in µs since the epoch; the app's NO_INSTANT when absent
        default=-(10**17), sa_column=Column(BigInteger, nullable=False, server_default=text(str(-(10**17))))
    )
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class RejectedInput(SQLModel, table=True):
    """A resource read from an EHR that storage rejected (a bad date, an unknown unit, ...).

    Not an input to grading, but kept so that every later evaluation of the patient still names
    it as left out (never silently dropped); removed when a usable newer version is stored."""

    __tablename__ = "rejected_input"
    __table_args__ = (Index("ix_rejected_input_server_patient_id", "server", "patient_id"),)

    server: str = Field(default="", primary_key=True, max_length=64)  # as StoredResource.server
    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    patient_id: str = Field(max_length=64)
    source_version: str = Field(default="", max_length=64)  # meta.versionId as sent
    source_last_updated: str = Field(default="", max_length=40)  # meta.lastUpdated as sent
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class EmittedResource(SQLModel, table=True):
    """A RiskAssessment or Provenance produced by a stored evaluation."""

    __tablename__ = "emitted_resource"
    __table_args__ = (Index("ix_emitted_resource_server_patient_id", "server", "patient_id"),)

    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)  # unique across servers: the server is in its business key
    server: str = Field(default="", max_length=64)  # the patient's server (StoredResource.server)
    patient_id: str = Field(max_length=64)
    method: str | None = Field(default=None, index=True, max_length=64)
    code: str | None = Field(default=None, max_length=64)
    occurrence: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    version_id: int = 1
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # when this version was stored (Bulk export `_since`); rows stored before 0006 carry its run
    updated: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True, index=True))


class ExportJob(SQLModel, table=True):
    """A FHIR Bulk Data export of stored results (`GET /fhir/$export`), run in the background."""

    __tablename__ = "export_job"

    id: str = Field(primary_key=True, max_length=64)
    status: str = Field(max_length=16)  # in-progress | complete | error
    types: str = Field(max_length=256)  # comma-separated resource types
    since: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    request: str = Field(max_length=2048)  # the kick-off URL, for the manifest
    actor: str = Field(max_length=256)
    server: str = Field(default="", max_length=64)  # the results of this EHR server's patients only
    created: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    finished: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    error: str = Field(default="", max_length=200)  # an error class; never clinical text


class ExportFile(SQLModel, table=True):
    """One NDJSON file of an export job."""

    __tablename__ = "export_file"

    job_id: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=128)
    resource_type: str = Field(max_length=64)
    count: int
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


# --- EHR integration (issue 5) -------------------------------------------------------------


class OutboxRow(SQLModel, table=True):
    """A transaction Bundle waiting for delivery to the EHR FHIR server.

    Written in the same database transaction as the evaluation it carries, so a stored
    evaluation is never without its write-back. Delivered by `iectox worker`.
    """

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    patient_id: str = Field(index=True, max_length=64)
    target: str = Field(default="default", max_length=64)  # FHIR server name (settings)
    request_id: str = Field(default="", max_length=128)  # the request whose evaluation it delivers (logs)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # transaction Bundle JSON
    status: str = Field(default="pending", index=True, max_length=16)  # pending | delivered | dead
    attempts: int = 0
    next_attempt_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    # A claim lease: a worker that dies mid-delivery loses the row when the lease expires.
    claimed_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    last_error: str = Field(default="", max_length=200)  # status code / error class; never clinical text
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    delivered_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class AuditEvent(SQLModel, table=True):
    """Who read or wrote what, and when (the application log carries no patient identifiers)."""

    __tablename__ = "audit_event"

    id: int | None = Field(default=None, primary_key=True)
    recorded: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    actor: str = Field(max_length=256)  # token iss + sub / client id, or "dev"
    action: str = Field(max_length=32)  # read | search | create | update | evaluate | hook | notify
    route: str = Field(max_length=128)  # route template
    resource_type: str | None = Field(default=None, max_length=64)
    resource_id: str | None = Field(default=None, max_length=64)
    patient_id: str | None = Field(default=None, index=True, max_length=64)
    status: int = 0
    request_id: str = Field(default="", max_length=128)  # the request's X-Request-ID (BALP transaction entity)
    server: str = Field(default="", max_length=64)  # whose patient and resource (StoredResource.server)


class SeenToken(SQLModel, table=True):
    """JWT ids already accepted (replay protection), kept until the token expires."""

    __tablename__ = "seen_token"

    key: str = Field(primary_key=True, max_length=300)  # iss + " " + jti
    expires: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))


class CdsFeedback(SQLModel, table=True):
    """CDS Hooks feedback as received."""

    __tablename__ = "cds_feedback"

    id: int | None = Field(default=None, primary_key=True)
    service_id: str = Field(index=True, max_length=64)
    received: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class CdsCard(SQLModel, table=True):
    """A card returned to a CDS client: the feedback report counts its feedback by type."""

    __tablename__ = "cds_card"

    id: int | None = Field(default=None, primary_key=True)  # issue order (clocks may tie)
    uuid: str = Field(unique=True, max_length=64)
    service_id: str = Field(max_length=64)
    hook: str = Field(max_length=32)
    server: str = Field(default="", max_length=64)  # the patient's server
    card_type: str = Field(max_length=32)  # grades | order-risk
    indicator: str = Field(max_length=16)  # info | warning | critical
    patient_id: str = Field(index=True, max_length=64)
    issued: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    grades: str = Field(max_length=512)  # what it showed: "astct-crs=2;astct-icans=indeterminate>=1;..."


class CdsLastAnswer(SQLModel, table=True):
    """The last answer to a hook for a patient and user, card or quiet: the quiet rule
    "unchanged" compares with its state (a quiet grade 0 between two grade 3 cards is a change)
    and with when this user was last shown a card."""

    __tablename__ = "cds_last_answer"

    server: str = Field(default="", primary_key=True, max_length=64)  # the patient's server
    patient_id: str = Field(primary_key=True, max_length=64)
    hook: str = Field(primary_key=True, max_length=32)
    user_id: str = Field(primary_key=True, max_length=256)  # context.userId ("" when absent)
    state: str = Field(max_length=1024)  # the grades (and, for order hooks, the orders) answered
    answered: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    shown: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class WatchedPatient(SQLModel, table=True):
    """A patient the reconciliation poll watches, with its `_lastUpdated` checkpoint."""

    __tablename__ = "watched_patient"

    target: str = Field(primary_key=True, max_length=64)  # FHIR server name (settings)
    patient_id: str = Field(primary_key=True, max_length=64)
    checkpoint: str = Field(default="", max_length=40)  # server meta.lastUpdated high-water mark
    updated: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
