"""Authentication and authorisation errors, rendered as OperationOutcome with WWW-Authenticate."""

from __future__ import annotations

from ..fhir.errors import FhirError, Issue

REALM = "iectox"


class SecurityConfigError(Exception):
    """The security settings cannot work (start-up refuses to continue)."""


class AuthError(FhirError):
    """401 (no or bad credentials) or 403 (valid credentials, not enough scope).

    `reason` is a fixed, short text (never token content) used in WWW-Authenticate.
    """

    def __init__(self, status: int, code: str, diagnostics: str, reason: str, scope: str | None = None) -> None:
        super().__init__(status, [Issue(code, diagnostics)])
        self.reason = reason
        self.scope = scope

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 403:
            need = f', scope="{self.scope}"' if self.scope else ""
            return {"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"{need}'}
        if self.status == 401 and self.reason == "missing":
            return {"WWW-Authenticate": f'Bearer realm="{REALM}"'}
        if self.status == 401:
            return {
                "WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token", error_description="{self.reason}"'
            }
        return {}


def unauthorized(diagnostics: str, reason: str = "invalid token", code: str = "login") -> AuthError:
    return AuthError(401, code, diagnostics, reason)


def forbidden(diagnostics: str, scope: str | None = None) -> AuthError:
    return AuthError(403, "forbidden", diagnostics, "insufficient scope", scope)
