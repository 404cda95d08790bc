"""iectox: grading of CRS and ICANS after immune effector cell therapy, over FHIR R4."""

__version__ = "0.1.0"
