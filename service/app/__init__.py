"""Application services: the use cases, between the adapters and the faces (API, CLI, EHR sync).

What lives here: `evaluate.py` (FHIR entries -> core grading -> validated FHIR outputs, the
scales' course and the risk scores) and `store.py` (storing input resources from a Bundle, one
resource or an EHR fetch; evaluating a stored patient; storing an evaluation and enqueueing its
write-back in the same session). What never does: HTTP, talking to an EHR, committing (the
caller owns the transaction), grading rules (service.core).
"""
