"""Verifying the JWT a CDS Hooks client (the EHR) sends with every call (CDS Hooks 2.0).

Each issuer is allowlisted in `auth_cds_clients` with its keys: a JWKS inline, in a file or at
a URL, and/or the `jku` URL prefixes it may point to. A `jku` header is used only when it
starts with one of the issuer's prefixes (never an arbitrary URL from the token).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from sqlmodel import Session

from ..config.settings import Settings
from ..storage import repository
from .errors import SecurityConfigError, unauthorized
from .jwks import Jwk, JwksError, JwkSet, KeyCache, parse_jwks
from .jws import audience_matches, check_alg, check_times, peek, verify_signature

CDS_ALGORITHMS = frozenset({"ES384", "RS384"})
MAX_JTI_CHARS = 256


def _https(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.password or parts.fragment:
        raise ValueError(f"{what} must be an https URL without credentials or fragment: {url!r}")
    return url


class CdsClientConfig(BaseModel):
    """One allowlisted CDS client (an entry of `auth_cds_clients`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    jwks: dict[str, Any] | None = None
    jwks_path: Path | None = None
    jwks_url: str | None = None
    jku_prefixes: tuple[str, ...] = ()

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else _https(v, "jwks_url")

    @field_validator("jku_prefixes")
    @classmethod
    def _prefixes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            _https(p, "a jku prefix")
            if not urlsplit(p).path.endswith("/") and not urlsplit(p).path.endswith(".json"):
                raise ValueError(f"a jku prefix must end with '/' (a folder) or be a .json URL: {p!r}")
        return v


@dataclass(frozen=True)
class CdsIssuer:
    iss: str
    static: JwkSet | None
    jwks_url: str | None
    jku_prefixes: tuple[str, ...]

    def allows_jku(self, jku: str) -> bool:
        try:
            _https(jku, "jku")
        except ValueError:
            return False
        if ".." in urlsplit(jku).path:
            return False
        return any(jku == p or (p.endswith("/") and jku.startswith(p)) for p in self.jku_prefixes)


class CdsTrust:
    """The CDS client allowlist, built once from settings (start-up), with the fetch cache."""

    def __init__(self, issuers: Mapping[str, CdsIssuer], cache: KeyCache) -> None:
        self.issuers, self.cache = dict(issuers), cache

    @classmethod
    def from_settings(cls, settings: Settings, cache: KeyCache) -> CdsTrust:
        issuers = {}
        for iss, raw in settings.auth_cds_clients.items():
            try:
                cfg = CdsClientConfig.model_validate(raw)
                static = None
                if cfg.jwks is not None:
                    static = parse_jwks(cfg.jwks)
                if cfg.jwks_path is not None:
                    from_file = parse_jwks(cfg.jwks_path.read_bytes())
                    static = JwkSet((static.keys if static else ()) + from_file.keys)
            except (ValidationError, JwksError, OSError) as exc:
                raise SecurityConfigError(f"auth_cds_clients[{iss!r}]: {exc}") from exc
            if static is None and cfg.jwks_url is None and not cfg.jku_prefixes:
                raise SecurityConfigError(
                    f"auth_cds_clients[{iss!r}]: give its keys (jwks, jwks_path or jwks_url) or jku_prefixes"
                )
            issuers[iss] = CdsIssuer(iss, static, cfg.jwks_url, cfg.jku_prefixes)
        return cls(issuers, cache)

    def candidates(self, issuer: CdsIssuer, kid: str, alg: str, jku: str | None) -> list[Jwk]:
        try:
            if jku is not None:
                return self.cache.get(jku, kid).candidates(kid, alg)
            found = issuer.static.candidates(kid, alg) if issuer.static else []
            if not found and issuer.jwks_url:
                found = self.cache.get(issuer.jwks_url, kid).candidates(kid, alg)
            return found
        except JwksError as exc:
            raise unauthorized("the client's signing keys could not be fetched", "unknown signing key") from exc


@dataclass(frozen=True, slots=True)
class CdsClient:
    """A verified CDS client call."""

    iss: str
    sub: str | None
    kid: str
    jti: str
    expires: datetime

    @property
    def actor(self) -> str:
        return (f"{self.iss} {self.sub}" if self.sub else self.iss)[:256]


def seen_token_key(iss: str, jti: str) -> str:
    key = f"{iss} {jti}"
    return key if len(key) <= 300 else "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def verify_cds_jwt(
    token: str,
    service_url: str,
    settings: Settings,
    session: Session,
    now: datetime,
    *,
    trust: CdsTrust | None = None,
) -> CdsClient:
    """Verify a CDS Hooks client JWT; AuthError (401) otherwise.

    Checks, in order: alg ES384 or RS384; `iss` allowlisted; `kid` present; `jku` (if any)
    allowlisted for that iss; the signature; `aud` == `service_url` exactly; exp and iat
    (required, `auth_leeway_seconds` of skew, exp - iat <= `auth_cds_max_lifetime_seconds`);
    nbf if present; `jti` present and never seen before (table `seen_token`, kept until exp).

    The jti is recorded in `session` (a savepoint, flushed): it is kept when the caller's
    transaction commits. Blocking (may fetch a JWKS): call it from a worker thread.
    `trust` is the allowlist built at start-up (app.state.security.cds); without it the
    allowlist is built from `settings` for this call (no fetch cache).
    """
    header, unverified = peek(token)
    alg = check_alg(header, CDS_ALGORITHMS)
    trust = trust or CdsTrust.from_settings(settings, KeyCache(0))
    iss = unverified.get("iss")
    issuer = trust.issuers.get(iss) if isinstance(iss, str) else None
    if issuer is None:
        raise unauthorized("issuer (iss) is not an allowlisted CDS client", "issuer not accepted")
    kid = header.get("kid")
    if not kid:
        raise unauthorized("the kid header is required", "malformed token")
    jku = header.get("jku")
    if jku is not None and not (isinstance(jku, str) and issuer.allows_jku(jku)):
        raise unauthorized("jku is not allowlisted for this issuer", "jku not accepted")
    claims = verify_signature(token, alg, trust.candidates(issuer, kid, alg, jku))
    if not audience_matches(claims, service_url):
        raise unauthorized("audience (aud) is not this service's URL", "wrong audience")
    leeway = settings.auth_leeway_seconds
    exp, iat = check_times(claims, now, leeway, require_iat=True)
    if iat is not None and exp - iat > settings.auth_cds_max_lifetime_seconds:
        raise unauthorized(
            f"token lifetime (exp - iat) over {settings.auth_cds_max_lifetime_seconds} s", "token lifetime too long"
        )
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
        raise unauthorized(f"claim jti is required (a string of at most {MAX_JTI_CHARS} characters)", "malformed token")
    expires = datetime.fromtimestamp(exp + leeway, UTC)
    if not repository.remember_token(session, seen_token_key(issuer.iss, jti), expires, now):
        raise unauthorized("token replayed (jti already used)", "token replayed")
    sub = claims.get("sub")
    return CdsClient(issuer.iss, sub if isinstance(sub, str) else None, kid, jti, expires)
