"""Test issuer for bearer tokens: an ES384 keypair generated once per test session, its JWKS,
the settings that trust it, and signed tokens (tests/conftest.py uses these by default)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://idp.iectox.test"
AUDIENCE = "http://iectox.test/fhir"
KID = "test-es384"
ALL_SCOPES = "system/*.read system/*.write"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KEY: PrivateKey = ec.generate_private_key(ec.SECP384R1())


def public_jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    public = key.public_key()
    text = ECAlgorithm.to_jwk(public) if isinstance(public, ec.EllipticCurvePublicKey) else RSAAlgorithm.to_jwk(public)
    return {**json.loads(text), "kid": kid, "use": "sig"}


def jwks(*pairs: tuple[PrivateKey, str]) -> dict[str, Any]:
    return {"keys": [public_jwk(k, kid) for k, kid in pairs or ((KEY, KID),)]}


def auth_settings() -> dict[str, Any]:
    """Settings keyword arguments: jwt mode trusting the test issuer."""
    return {"auth_mode": "jwt", "auth_issuer": ISSUER, "auth_audience": AUDIENCE, "auth_jwks": json.dumps(jwks())}


def sign(
    claims: dict[str, Any], key: PrivateKey = KEY, alg: str = "ES384", headers: dict[str, Any] | None = None
) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": KID, **(headers or {})})


def token(scope: str | None = ALL_SCOPES, *, lifetime: int = 3600, now: float | None = None, **claims: Any) -> str:
    """A valid access token from the test issuer (override any claim; None removes it)."""
    t = int(now if now is not None else time.time())
    body: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "test-client",
        "aud": AUDIENCE,
        "iat": t,
        "exp": t + lifetime,
        "jti": str(uuid.uuid4()),
        "scope": scope,
    }
    body.update(claims)
    return sign({k: v for k, v in body.items() if v is not None})


def bearer(scope: str | None = ALL_SCOPES, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(scope, **claims)}"}
