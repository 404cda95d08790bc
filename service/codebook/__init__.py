"""The codebook: which FHIR codes (and, for drugs and procedures, which texts) feed which concept.

What lives here: the default code tables (default.json) and the loader with the site overlay
(loader.py). What never does: grading decisions or FHIR parsing; concept names come from the
core's registry (service.core.concepts), and the loader rejects a name the core does not know.
"""

from .loader import DEFAULT_PATH, ICD10CM, Codebook, CodebookError, Coding, Concept, load_codebook

__all__ = ["DEFAULT_PATH", "ICD10CM", "Codebook", "CodebookError", "Coding", "Concept", "load_codebook"]
