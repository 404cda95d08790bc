"""JSON Web Key Sets: parsing (public RSA / EC signing keys only) and a fetch cache.

The cache lives on the application (app.state), never in a module global. Fetching is
synchronous (httpx); callers run in a worker thread (sync FastAPI dependencies).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

# Asymmetric algorithms only: never `none`, never HMAC (a shared secret is not a key set).
SIGNING_ALGORITHMS = frozenset({"RS256", "RS384", "ES256", "ES384"})
CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 512 * 1024

PublicKey = RSAPublicKey | EllipticCurvePublicKey
Fetch = Callable[[str], bytes]


class JwksError(ValueError):
    """A key set that cannot be read or fetched."""


@dataclass(frozen=True, slots=True)
class Jwk:
    kid: str | None
    alg: str | None  # the JWK's own `alg`, when it names one
    key: PublicKey

    def fits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False
        if alg.startswith("RS"):
            return isinstance(self.key, RSAPublicKey)
        return isinstance(self.key, EllipticCurvePublicKey) and self.key.curve.name == CURVES.get(alg)


@dataclass(frozen=True, slots=True)
class JwkSet:
    keys: tuple[Jwk, ...]

    def candidates(self, kid: str | None, alg: str) -> list[Jwk]:
        """Keys that may have signed a token with this `kid` (any key if it has none) and `alg`."""
        return [k for k in self.keys if (kid is None or k.kid == kid) and k.fits(alg)]

    def has_kid(self, kid: str) -> bool:
        return any(k.kid == kid for k in self.keys)


def _one(jwk: Mapping[str, Any], i: int) -> Jwk | None:
    if jwk.get("kty") not in ("RSA", "EC"):
        return None  # "oct" (HMAC) and unknown key types are never used
    if jwk.get("use") not in (None, "sig"):
        return None
    if "d" in jwk or "p" in jwk:
        raise JwksError(f"keys[{i}] is a private key: a JWKS here must hold public keys only")
    alg = jwk.get("alg")
    if alg is not None and alg not in SIGNING_ALGORITHMS:
        return None
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwksError(f"keys[{i}].kid must be a string")
    try:
        key = jwt.PyJWK(dict(jwk)).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise JwksError(f"keys[{i}] is not a valid {jwk.get('kty')} key ({type(exc).__name__})") from exc
    if isinstance(key, RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return None
    elif not isinstance(key, EllipticCurvePublicKey) or key.curve.name not in CURVES.values():
        return None
    return Jwk(kid, alg, key)


def parse_jwks(raw: bytes | str | Mapping[str, Any]) -> JwkSet:
    """The usable signing keys of a JWKS (RSA >= 2048 bits, EC P-256 / P-384); raises JwksError."""
    if isinstance(raw, Mapping):
        doc: Any = raw
    else:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise JwksError("not JSON") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise JwksError('not a JWKS: expected {"keys": [...]}')
    keys = []
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, Mapping):
            raise JwksError(f"keys[{i}] is not an object")
        one = _one(jwk, i)
        if one is not None:
            keys.append(one)
    if not keys:
        raise JwksError("no usable public RSA (>= 2048 bits) or EC (P-256, P-384) signing key")
    return JwkSet(tuple(keys))


def http_fetch(url: str, timeout: float = 5.0) -> bytes:
    """GET a JWKS: no redirects, at most MAX_JWKS_BYTES."""
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False) as client,
            client.stream("GET", url, headers={"Accept": "application/json"}) as r,
        ):
            if r.status_code != 200:
                raise JwksError(f"HTTP {r.status_code}")
            body = bytearray()
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksError("JWKS too large")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise JwksError(type(exc).__name__) from exc


class KeyCache:
    """Fetched key sets by URL, kept `ttl` seconds; an unknown kid refetches early, but at most
    once every `min_refresh` seconds per URL (so random kids cannot make it fetch in a loop).
    If a refetch fails, the keys fetched before are used."""

    def __init__(
        self,
        ttl: float,
        fetch: Fetch = http_fetch,
        *,
        min_refresh: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl, self.min_refresh = ttl, min_refresh
        self._fetch, self._clock = fetch, clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, JwkSet]] = {}
        self._attempts: dict[str, float] = {}

    def get(self, url: str, kid: str | None = None) -> JwkSet:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(url)
            attempted = self._attempts.get(url)
            recent = attempted is not None and now - attempted < self.min_refresh
            if entry is not None:
                stale = now - entry[0] >= self.ttl or (kid is not None and not entry[1].has_kid(kid))
                if not stale or recent:
                    return entry[1]
            elif recent:
                raise JwksError("keys unavailable (the last fetch failed; retried shortly)")
            self._attempts[url] = now
        try:
            keys = parse_jwks(self._fetch(url))
        except (JwksError, httpx.HTTPError, OSError) as exc:
            if entry is not None:
                return entry[1]
            raise exc if isinstance(exc, JwksError) else JwksError(type(exc).__name__) from exc
        with self._lock:
            self._entries[url] = (now, keys)
        return keys
