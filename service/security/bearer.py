"""Bearer access tokens: a JWT from the configured issuer (SMART Backend Services) on /fhir, or from
the EHR's authorization server for the clinician app (SMART App Launch) on /app/api."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..config.settings import Settings
from ..fhir.errors import FhirError
from .errors import unauthorized
from .jwks import Jwk, JwksError, JwkSet, KeyCache
from .jws import audience_matches, check_alg, check_times, peek, verify_signature
from .scopes import Principal, parse_scopes


@dataclass(frozen=True)
class IssuerKeys:
    """The issuer's keys: read once at start-up (inline / file) and/or fetched from a URL."""

    static: JwkSet | None
    url: str | None
    cache: KeyCache

    def candidates(self, kid: str | None, alg: str) -> list[Jwk]:
        found = self.static.candidates(kid, alg) if self.static else []
        if not found and self.url:
            try:
                found = self.cache.get(self.url, kid).candidates(kid, alg)
            except JwksError as exc:
                raise FhirError.one(503, "transient", "the token issuer's signing keys are unavailable") from exc
        return found


def verify_access_token(token: str, settings: Settings, keys: IssuerKeys, now: datetime) -> Principal:
    """The caller of a verified token from the service's issuer (`auth_issuer`, `auth_audience`);
    AuthError (401) for anything not exactly right (see `verify_jwt`)."""
    return verify_jwt(
        token, settings.auth_issuer, settings.auth_audience, keys, settings.auth_algorithms, settings, now
    )


def verify_app_token(token: str, settings: Settings, keys: IssuerKeys, now: datetime) -> Principal:
    """The user of the clinician app: an access token the EHR issued to the app (SMART App
    Launch), signed by `app_issuer`, for the EHR's FHIR base `app_fhir_base`."""
    principal = verify_jwt(
        token, settings.app_issuer, settings.app_fhir_base, keys, settings.app_algorithms, settings, now
    )
    # A token the EHR issued to another SMART app is not this app's: its client must be ours.
    _, claims = peek(token)  # verified above
    client = claims.get("client_id", claims.get("azp"))
    if client is not None and client != settings.app_client_id:
        raise unauthorized("token issued to another client (client_id)", "wrong client")
    return principal


def verify_jwt(
    token: str,
    issuer: str | None,
    audience: str | None,
    keys: IssuerKeys,
    algorithms: tuple[str, ...],
    settings: Settings,
    now: datetime,
) -> Principal:
    """Checks: alg in `algorithms` (asymmetric only), `iss` == `issuer`, the signature with
    the issuer's key (by kid), `aud` contains `audience`, exp / iat / nbf with
    `auth_leeway_seconds`, and a subject (`sub`, else `client_id` / `azp`)."""
    header, unverified = peek(token)
    alg = check_alg(header, algorithms)
    if issuer is None or unverified.get("iss") != issuer:
        raise unauthorized("token issuer (iss) not accepted", "wrong issuer")
    claims = verify_signature(token, alg, keys.candidates(header.get("kid"), alg))
    if not audience_matches(claims, audience or ""):
        raise unauthorized("token audience (aud) not accepted", "wrong audience")
    check_times(claims, now, settings.auth_leeway_seconds, require_iat=False)
    subject = next((claims[c] for c in ("sub", "client_id", "azp") if isinstance(claims.get(c), str)), None)
    if not subject:
        raise unauthorized("token names no subject (sub or client_id)", "malformed token")
    scopes = claims["scope"] if "scope" in claims else claims.get("scp")
    return Principal(actor=f"{claims['iss']} {subject}"[:256], grants=parse_scopes(scopes))
