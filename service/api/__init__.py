"""HTTP API (FastAPI): thin routes that parse, call the services, and respond in FHIR JSON."""
