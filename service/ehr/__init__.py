"""Everything that talks out to an EHR's FHIR server.

``FhirClient`` (``client.py``) reads, searches (with paging), fetches a patient's grading
inputs and posts transactions, with retries; ``smart.py`` obtains and caches SMART Backend
Services tokens; ``sync.py`` brings a patient in (fetch -> store -> evaluate -> enqueue);
``notifications.py`` parses subscription notifications; ``poll.py`` is the reconciliation
poll; ``worker.py`` delivers the outbox. Servers are configured in ``Settings.ehr_servers``
(``service.config.FhirServerConfig``); the entry named ``"default"`` is the default target.

What never lives here: grading rules, HTTP routes, inbound auth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .client import (
    DEFAULT_SCOPE,
    FhirClient,
    FhirServerConfig,
    parse_retry_after,
)
from .errors import EhrError, FhirAuthError, FhirConfigError, FhirHttpError, FhirUnavailable
from .smart import TokenCache

if TYPE_CHECKING:
    from ..config.settings import Settings

DEFAULT_SERVER = "default"

__all__ = [
    "DEFAULT_SCOPE",
    "DEFAULT_SERVER",
    "EhrError",
    "FhirAuthError",
    "FhirClient",
    "FhirConfigError",
    "FhirHttpError",
    "FhirServerConfig",
    "FhirUnavailable",
    "TokenCache",
    "parse_retry_after",
    "server_config",
]


def server_config(settings: Settings, name: str = DEFAULT_SERVER) -> FhirServerConfig:
    """The ``ehr_servers`` entry ``name``; KeyError (naming the missing entry) if absent."""
    try:
        return settings.ehr_servers[name]
    except KeyError:
        raise KeyError(f"no EHR FHIR server named {name!r} in ehr_servers (IECTOX_EHR_SERVERS)") from None
