"""FHIR adapters: lean parsing in (FHIR R4 JSON -> core series) and validated resources out."""
