"""FHIR adapters: lean parsing in (FHIR R4 JSON -> core series, ingest.py), validated resources
out (emit.py: RiskAssessment, Provenance, Parameters, Bundles; writeback.py: the write-back
transaction Bundles), OperationOutcome errors and the CapabilityStatement.

What never lives here: grading decisions, database access, HTTP, talking to an EHR.
"""
