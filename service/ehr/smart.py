"""SMART Backend Services (client_credentials + private_key_jwt) for calls to an EHR's FHIR server.

1. Discover ``token_endpoint`` from ``{base}/.well-known/smart-configuration`` (unless the
   server config names ``token_url``).
2. POST ``grant_type=client_credentials``, ``scope``, ``client_assertion_type=
   urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and ``client_assertion``: a JWT
   signed RS384 or ES384 with ``iss`` = ``sub`` = client_id, ``aud`` = the token URL, ``exp``
   at most 5 minutes ahead, a fresh ``jti`` (uuid4) and the ``kid`` header.
3. Cache the access token per (token URL, client_id, scope) until shortly before it expires;
   a 401 from the FHIR server drops it (``TokenCache.invalidate``) and the client asks again once.

The HTTP calls themselves (with retries) are done by ``FhirClient``, which passes its request
function in; this module holds the protocol and the cache.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .errors import EhrError, FhirAuthError, FhirConfigError, FhirHttpError

if TYPE_CHECKING:
    from ..config.ehr import FhirServerConfig

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART caps the assertion lifetime at 5 minutes; stay a little below for clock skew.
ASSERTION_LIFETIME_S = 240
DEFAULT_EXPIRES_IN_S = 300  # when the token response omits expires_in

# (method, url, rtype, form data or None) -> response (2xx/3xx only: errors are raised)
Send = Callable[..., Awaitable[httpx.Response]]
TokenKey = tuple[str, str, str]


@dataclass
class _Cached:
    token: str
    expires_at: float  # epoch seconds, when we stop using it


class TokenCache:
    """Access tokens per (token URL, client_id, scope) and token endpoints per FHIR base URL.

    Share one instance between the FhirClients of a process so that a token is requested once
    per server. A token is used until ``margin_s`` (at most half its lifetime) before it expires.
    """

    def __init__(self, *, margin_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.margin_s = margin_s
        self.clock = clock
        self._tokens: dict[TokenKey, _Cached] = {}
        self._endpoints: dict[str, str] = {}
        self._locks: dict[TokenKey | str, asyncio.Lock] = {}

    def get(self, key: TokenKey) -> str | None:
        cached = self._tokens.get(key)
        if cached is None or self.clock() >= cached.expires_at:
            return None
        return cached.token

    def put(self, key: TokenKey, token: str, expires_in: float) -> None:
        margin = min(self.margin_s, expires_in / 2)
        self._tokens[key] = _Cached(token, self.clock() + expires_in - margin)

    def invalidate(self, key: TokenKey, token: str | None = None) -> None:
        """Drop the cached token (only if it is still ``token``, when given)."""
        cached = self._tokens.get(key)
        if cached is not None and (token is None or cached.token == token):
            del self._tokens[key]

    def clear(self) -> None:
        self._tokens.clear()
        self._endpoints.clear()

    def endpoint(self, base_url: str) -> str | None:
        return self._endpoints.get(base_url)

    def set_endpoint(self, base_url: str, token_url: str) -> None:
        self._endpoints[base_url] = token_url

    def lock(self, key: TokenKey | str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock


# Parsed keys by (PEM, alg): parsing an RSA key costs milliseconds; a rotated key file is
# simply a new PEM.
_KEY_CACHE: dict[tuple[bytes, str], rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {}


def load_private_key(server: FhirServerConfig) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The signing key of a server config (PEM file or inline PEM), checked against ``alg``."""
    if server.private_key is not None:
        pem = server.private_key.get_secret_value().encode()
        source = "private_key"
    elif server.private_key_path is not None:
        source = str(server.private_key_path)
        try:
            pem = Path(server.private_key_path).read_bytes()
        except OSError as exc:
            raise FhirConfigError(f"cannot read the private key file {source}: {exc.strerror}") from exc
    else:
        raise FhirConfigError("SMART needs private_key_path (or private_key)")
    cache_key = (pem, server.alg)
    if cache_key in _KEY_CACHE:
        return _KEY_CACHE[cache_key]
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise FhirConfigError(f"{source} is not an unencrypted PEM private key") from exc
    if server.alg == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
            raise FhirConfigError(f"alg RS384 needs an RSA private key of at least 2048 bits ({source})")
    elif not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise FhirConfigError(f"alg ES384 needs an EC P-384 private key ({source})")
    if len(_KEY_CACHE) > 64:
        _KEY_CACHE.clear()
    _KEY_CACHE[cache_key] = key
    return key


def client_assertion(
    server: FhirServerConfig,
    token_url: str,
    *,
    now: float | None = None,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
) -> str:
    """A signed private_key_jwt client assertion for ``token_url`` (new ``jti`` every call)."""
    if not server.client_id:
        raise FhirConfigError("SMART needs client_id")
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": server.client_id,
        "sub": server.client_id,
        "aud": token_url,
        "iat": issued,
        "exp": issued + ASSERTION_LIFETIME_S,
        "jti": str(uuid.uuid4()),
    }
    headers: dict[str, Any] = {"typ": "JWT"}
    if server.key_id:
        headers["kid"] = server.key_id
    return jwt.encode(claims, key or load_private_key(server), algorithm=server.alg, headers=headers)


def check_smart_configuration(doc: Any, alg: str) -> str:
    """The token endpoint of a ``.well-known/smart-configuration`` document, after checking
    that it offers client_credentials with private_key_jwt and ``alg``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("token_endpoint"), str):
        raise EhrError("smart-configuration has no token_endpoint")
    grants = doc.get("grant_types_supported")
    if isinstance(grants, list) and "client_credentials" not in grants:
        raise EhrError("the server does not offer the client_credentials grant")
    methods = doc.get("token_endpoint_auth_methods_supported")
    if isinstance(methods, list) and "private_key_jwt" not in methods:
        raise EhrError("the server does not accept private_key_jwt client authentication")
    algs = doc.get("token_endpoint_auth_signing_alg_values_supported")
    if isinstance(algs, list) and alg not in algs:
        raise EhrError(f"the server does not accept {alg} client assertions (it lists {', '.join(map(str, algs))})")
    return str(doc["token_endpoint"])


class SmartBackendAuth:
    """Bearer tokens for one server config, through a (shared) TokenCache."""

    def __init__(self, server: FhirServerConfig, tokens: TokenCache, *, clock: Callable[[], float] = time.time) -> None:
        self.server = server
        self.tokens = tokens
        self.clock = clock

    async def token_url(self, send: Send) -> str:
        if self.server.token_url:
            return self.server.token_url
        base = self.server.base_url
        cached = self.tokens.endpoint(base)
        if cached:
            return cached
        async with self.tokens.lock(base):
            cached = self.tokens.endpoint(base)
            if cached:
                return cached
            resp = await send("GET", f"{base}/.well-known/smart-configuration", rtype="smart-configuration")
            try:
                doc = resp.json()
            except ValueError as exc:
                raise EhrError("smart-configuration is not JSON") from exc
            url = check_smart_configuration(doc, self.server.alg)
            self.tokens.set_endpoint(base, url)
            return url

    async def cache_key(self, send: Send) -> TokenKey:
        return (await self.token_url(send), self.server.client_id or "", self.server.scope)

    async def token(self, send: Send) -> str:
        """A valid access token, from the cache or freshly requested."""
        key = await self.cache_key(send)
        token = self.tokens.get(key)
        if token:
            return token
        async with self.tokens.lock(key):
            token = self.tokens.get(key)
            if token:
                return token
            token, expires_in = await self._request_token(key[0], send)
            self.tokens.put(key, token, expires_in)
            return token

    async def invalidate(self, send: Send, token: str) -> None:
        self.tokens.invalidate(await self.cache_key(send), token)

    async def _request_token(self, token_url: str, send: Send) -> tuple[str, float]:
        signing_key = load_private_key(self.server)

        def form() -> dict[str, str]:  # a new assertion (new jti) for every attempt
            return {
                "grant_type": "client_credentials",
                "scope": self.server.scope,
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                # real time: the token server checks iat/exp against its own clock
                "client_assertion": client_assertion(self.server, token_url, key=signing_key),
            }

        try:
            resp = await send("POST", token_url, rtype="token", form=form)
        except FhirHttpError as exc:
            if exc.retryable:
                raise
            body = exc.body if isinstance(exc.body, dict) else {}
            raise FhirAuthError(
                exc.status,
                error=str(body.get("error")) if body.get("error") else None,
                error_description=str(body.get("error_description")) if body.get("error_description") else None,
                body=exc.body,
            ) from exc
        try:
            doc = resp.json()
        except ValueError as exc:
            raise FhirAuthError(resp.status_code, error="invalid_response", error_description="not JSON") from exc
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise FhirAuthError(resp.status_code, error="invalid_response", error_description="no access_token")
        if str(doc.get("token_type", "")).lower() != "bearer":
            raise FhirAuthError(
                resp.status_code, error="invalid_response", error_description="token_type is not bearer"
            )
        expires_in = doc.get("expires_in", DEFAULT_EXPIRES_IN_S)
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
            expires_in = DEFAULT_EXPIRES_IN_S
        return token, float(expires_in)
