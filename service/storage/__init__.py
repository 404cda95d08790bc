"""Storage (sqlmodel): ingested FHIR resources and emitted assessments. SQLite or PostgreSQL."""
