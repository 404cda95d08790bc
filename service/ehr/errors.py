"""Errors of the EHR FHIR client (re-exported by ``service.ehr.client``).

Messages never carry patient ids, URLs with query strings, or response text (an
OperationOutcome's diagnostics may quote clinical values): only the method, the resource type
and the HTTP status. The parsed body stays available on the exception for callers that need it.
"""

from __future__ import annotations

from typing import Any


class EhrError(Exception):
    """Any failure talking to an EHR FHIR server."""


class FhirConfigError(EhrError):
    """The server configuration cannot work (unreadable key, wrong key type for `alg`, ...)."""


class FhirHttpError(EhrError):
    """The server answered an HTTP error.

    ``retryable`` is True for 429 and 5xx (returned after the retries ran out), False for any
    other status. ``outcome`` is the OperationOutcome of the response, if it carried one.
    """

    def __init__(
        self,
        status: int,
        *,
        retryable: bool,
        method: str = "",
        resource_type: str = "",
        outcome: dict[str, Any] | None = None,
        body: Any = None,
        attempts: int = 1,
        message: str | None = None,
    ) -> None:
        self.status = status
        self.retryable = retryable
        self.method = method
        self.resource_type = resource_type
        self.outcome = outcome
        self.body = body
        self.attempts = attempts
        codes = ",".join(
            str(i.get("code")) for i in (outcome or {}).get("issue", []) if isinstance(i, dict) and i.get("code")
        )
        text = message or f"{method} {resource_type}: HTTP {status}".strip()
        if codes and not message:
            text += f" (issue codes: {codes})"
        if attempts > 1:
            text += f" after {attempts} attempts"
        super().__init__(text)


class FhirAuthError(FhirHttpError):
    """SMART Backend Services failed: the token endpoint refused the client (4xx), or the FHIR
    server still answered 401 with a freshly issued token. Never retried automatically.

    ``error`` / ``error_description`` are the OAuth error fields (RFC 6749 section 5.2).
    """

    def __init__(
        self,
        status: int,
        *,
        error: str | None = None,
        error_description: str | None = None,
        method: str = "POST",
        resource_type: str = "token",
        body: Any = None,
    ) -> None:
        self.error = error
        self.error_description = error_description
        detail = f"{error}: {error_description}" if error_description else (error or "")
        super().__init__(
            status,
            retryable=False,
            method=method,
            resource_type=resource_type,
            body=body,
            message=f"SMART authorization failed: HTTP {status}" + (f" ({detail})" if detail else ""),
        )


class FhirUnavailable(EhrError):
    """The server could not be reached (connect errors, timeouts, dropped connections) after
    all retries."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        self.attempts = attempts
        super().__init__(message)
