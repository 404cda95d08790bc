"""Start-up checks of the security settings, and what the app keeps of them (app.state.security).

The service refuses to start rather than run open by mistake: jwt mode needs an issuer, an
audience and keys; dev mode (no tokens) needs a loopback bind.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config.settings import Settings
from .bearer import IssuerKeys
from .cds import CdsTrust
from .errors import SecurityConfigError
from .jwks import SIGNING_ALGORITHMS, Fetch, JwksError, JwkSet, KeyCache, http_fetch, parse_jwks

log = logging.getLogger("iectox.security")

JWT, DEV = "jwt", "dev"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, host: str) -> None:
    """Dev mode (no authentication) only on a loopback address."""
    if settings.auth_mode == DEV and not is_loopback(host):
        raise SecurityConfigError(
            f"IECTOX_AUTH_MODE=dev (no authentication) may only listen on loopback (127.0.0.1, ::1, localhost), "
            f"not {host!r}: bind to 127.0.0.1 or configure IECTOX_AUTH_MODE=jwt"
        )


@dataclass(frozen=True)
class SecurityConfig:
    mode: str  # jwt | dev
    bearer: IssuerKeys | None  # None in dev mode
    cds: CdsTrust
    app: IssuerKeys | None = None  # the EHR's keys for the clinician app's tokens (None: not configured)


APP_SETTINGS = ("app_client_id", "app_fhir_base", "app_issuer", "app_jwks_url")


def _app_keys(settings: Settings, cache: KeyCache) -> IssuerKeys | None:
    given = [name for name in APP_SETTINGS if getattr(settings, name)]
    if not given:
        return None
    if len(given) < len(APP_SETTINGS):
        missing = [f"IECTOX_{n.upper()}" for n in APP_SETTINGS if n not in given]
        raise SecurityConfigError(f"the clinician app (SMART App Launch) needs {', '.join(missing)} as well")
    bad = sorted(set(settings.app_algorithms) - SIGNING_ALGORITHMS)
    if bad or not settings.app_algorithms:
        raise SecurityConfigError(
            f"IECTOX_APP_ALGORITHMS: {bad or 'empty'} not accepted; choose from {sorted(SIGNING_ALGORITHMS)}"
        )
    for name in ("app_fhir_base", "app_jwks_url"):
        parts = urlsplit(getattr(settings, name))
        if not (parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname))):
            raise SecurityConfigError(f"IECTOX_{name.upper()} must be https (http only on loopback)")
    return IssuerKeys(None, settings.app_jwks_url, cache)


def _bearer_keys(settings: Settings, cache: KeyCache) -> IssuerKeys:
    missing = [f"IECTOX_{name.upper()}" for name in ("auth_issuer", "auth_audience") if not getattr(settings, name)]
    if not (settings.auth_jwks or settings.auth_jwks_path or settings.auth_jwks_url):
        missing.append("one of IECTOX_AUTH_JWKS, IECTOX_AUTH_JWKS_PATH, IECTOX_AUTH_JWKS_URL")
    if missing:
        raise SecurityConfigError(
            "IECTOX_AUTH_MODE=jwt needs "
            + ", ".join(missing)
            + " (or IECTOX_AUTH_MODE=dev on loopback for development)"
        )
    bad = sorted(set(settings.auth_algorithms) - SIGNING_ALGORITHMS)
    if bad or not settings.auth_algorithms:
        raise SecurityConfigError(
            f"IECTOX_AUTH_ALGORITHMS: {bad or 'empty'} not accepted; choose from {sorted(SIGNING_ALGORITHMS)}"
        )
    static: JwkSet | None = None
    try:
        if settings.auth_jwks:
            static = parse_jwks(settings.auth_jwks)
        if settings.auth_jwks_path:
            from_file = parse_jwks(settings.auth_jwks_path.read_bytes())
            static = JwkSet((static.keys if static else ()) + from_file.keys)
    except JwksError as exc:
        raise SecurityConfigError(f"IECTOX_AUTH_JWKS / IECTOX_AUTH_JWKS_PATH: {exc}") from exc
    except OSError as exc:
        raise SecurityConfigError(f"IECTOX_AUTH_JWKS_PATH: cannot read ({exc.strerror})") from exc
    url = settings.auth_jwks_url
    if url is not None:
        parts = urlsplit(url)
        if not (parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname))):
            raise SecurityConfigError("IECTOX_AUTH_JWKS_URL must be https (http only on loopback)")
    return IssuerKeys(static, url, cache)


def load_security(settings: Settings, fetch: Fetch = http_fetch) -> SecurityConfig:
    """Check the settings (SecurityConfigError with a clear message) and build the key stores."""
    target = settings.audit_forward_target
    if target is not None and target not in settings.ehr_servers:
        raise SecurityConfigError(
            f"IECTOX_AUDIT_FORWARD_TARGET={target!r} is not a server of IECTOX_EHR_SERVERS: the audit trail would "
            "never leave"
        )
    home, target = settings.home_server, settings.writeback_target
    if home is not None and settings.ehr_servers and home not in settings.ehr_servers:
        raise SecurityConfigError(f"IECTOX_HOME_SERVER={home!r} is not a server of IECTOX_EHR_SERVERS")
    if target is not None and target not in settings.ehr_servers:
        raise SecurityConfigError(
            f"IECTOX_WRITEBACK_TARGET={target!r} is not a server of IECTOX_EHR_SERVERS: no result would be written back"
        )
    strangers = sorted({s for s in settings.auth_client_servers.values() if s not in settings.ehr_servers})
    if strangers:
        raise SecurityConfigError(
            f"IECTOX_AUTH_CLIENT_SERVERS names {strangers}, not servers of IECTOX_EHR_SERVERS: each client's data "
            "are kept under a configured EHR server"
        )
    cache = KeyCache(settings.auth_jwks_cache_seconds, fetch)
    cds = CdsTrust.from_settings(settings, cache)
    app = _app_keys(settings, cache)
    if settings.auth_mode == DEV:
        check_bind(settings, settings.host)
        log.warning(
            "IECTOX_AUTH_MODE=dev: /fhir accepts requests without a token (actor 'dev', loopback only); "
            "never use this in production"
        )
        return SecurityConfig(DEV, None, cds, app)
    if settings.auth_cds_clients and not settings.auth_public_base_url:
        # A CDS client JWT's `aud` is this service's URL: never taken from the request's Host header.
        raise SecurityConfigError(
            "IECTOX_AUTH_PUBLIC_BASE_URL is required when CDS clients are configured (IECTOX_AUTH_CDS_CLIENTS): "
            "it is the audience a CDS client JWT must carry"
        )
    return SecurityConfig(JWT, _bearer_keys(settings, cache), cds, app)
