"""Configuration: Settings (pydantic-settings, env prefix IECTOX_), EHR server entries, the clock.

A leaf of the layers: it imports only the core's configuration types, never an adapter, the
EHR client, storage or the API. A Settings instance is built once per process and passed down.
"""

from .clock import utc_now
from .ehr import DEFAULT_SCOPE, FhirServerConfig
from .settings import Settings

__all__ = ["DEFAULT_SCOPE", "FhirServerConfig", "Settings", "utc_now"]
