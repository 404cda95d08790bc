"""CDS Hooks 2.0: the hook services (service.py), their request/response models (schemas.py)
and the cards (cards.py).

What lives here: the registry of hook services, prefetch handling, and turning an Evaluation
into cards by reading GradeResult fields. What never does: HTTP routing (service/api/cds.py),
client JWT checks (service/security/cds.py), grading rules (service/core) or rationale parsing.
"""
