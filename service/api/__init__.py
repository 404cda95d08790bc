"""HTTP API (FastAPI): routes that only parse, call a service and respond, in FHIR JSON.

What lives here: the app factory, Annotated dependencies (settings, codebook, session, clock),
auth dependencies and the audit trail, and the routes under /fhir, /cds-services, /metrics,
/healthz and /readyz. What never does: clinical logic, FHIR planning, EHR calls.
"""
