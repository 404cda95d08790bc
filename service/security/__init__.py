"""Inbound security: bearer JWTs with SMART scopes on /fhir, CDS Hooks client JWTs, dev mode.

What lives here: token verification, key sets, scope parsing and the start-up checks
(docs/security.md). What never does: routes (service/api/auth.py wires these in), grading, EHR
calls. Nothing here is global: the key stores live on app.state.security.
"""

from .cds import CdsClient, CdsTrust, verify_cds_jwt
from .config import SecurityConfig, check_bind, is_loopback, load_security
from .errors import AuthError, SecurityConfigError
from .scopes import READ, WRITE, Principal

__all__ = [
    "READ",
    "WRITE",
    "AuthError",
    "CdsClient",
    "CdsTrust",
    "Principal",
    "SecurityConfig",
    "SecurityConfigError",
    "check_bind",
    "is_loopback",
    "load_security",
    "verify_cds_jwt",
]
