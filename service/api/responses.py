"""FHIR JSON responses (application/fhir+json, serialised with orjson)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FhirResponse(JSONResponse):
    """A JSON response (so the OpenAPI document describes its body by the route's model)."""

    media_type = "application/fhir+json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
