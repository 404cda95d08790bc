"""Storage (sqlmodel): stored inputs, emitted assessments, the outbox, audit rows, seen JWT ids,
CDS feedback and the poll's watched patients; Alembic migrations (migrations/). SQLite or
PostgreSQL.

What lives here: tables, every query (repository.py, outbox.py), engines and migrations.
What never does: FHIR parsing (callers hand in the index fields next to the JSON they store),
adapters, EHR, CDS or API code, and commits (the caller owns the transaction).
"""
