"""The JWT checks shared by bearer access tokens and CDS Hooks client JWTs.

Claims are checked here against an explicit `now` (PyJWT checks only the signature), so the
checks are pure and testable. Error texts never echo token content beyond the `alg` name.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import jwt

from .errors import unauthorized
from .jwks import Jwk

MAX_TOKEN_CHARS = 16 * 1024
_SIGNATURE_ONLY = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}


def peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, not yet verified (used only to choose the key and the checks)."""
    if len(token) > MAX_TOKEN_CHARS:
        raise unauthorized("token too large", "malformed token")
    if token.count(".") != 2:
        raise unauthorized("not a JWT (compact JWS with three parts)", "malformed token")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise unauthorized("malformed token", "malformed token") from exc
    if not isinstance(claims, dict):
        raise unauthorized("malformed token: claims are not an object", "malformed token")
    return header, claims


def check_alg(header: dict[str, Any], accepted: Collection[str]) -> str:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in accepted:
        shown = alg[:16] if isinstance(alg, str) else type(alg).__name__
        raise unauthorized(
            f"signature algorithm {shown!r} not accepted (accepted: {', '.join(sorted(accepted))})",
            "algorithm not accepted",
        )
    if "crit" in header:
        raise unauthorized("critical header parameters are not supported", "malformed token")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise unauthorized("kid must be a string", "malformed token")
    return alg


def verify_signature(token: str, alg: str, candidates: Sequence[Jwk]) -> dict[str, Any]:
    if not candidates:
        raise unauthorized("no trusted key matches the token's kid and alg", "unknown signing key")
    for k in candidates:
        try:
            claims: dict[str, Any] = jwt.decode(token, k.key, algorithms=[alg], options=_SIGNATURE_ONLY)  # type: ignore[arg-type]
            return claims
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            raise unauthorized("malformed token", "malformed token") from exc
    raise unauthorized("signature verification failed", "bad signature")


def _number(claims: dict[str, Any], name: str) -> float | None:
    v = claims.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise unauthorized(f"claim {name} must be a NumericDate", "malformed token")
    return float(v)


def check_times(
    claims: dict[str, Any], now: datetime, leeway: float, *, require_iat: bool
) -> tuple[float, float | None]:
    """exp (required), iat (required if asked) and nbf, each with `leeway` seconds of skew."""
    ts = now.timestamp()
    exp = _number(claims, "exp")
    if exp is None:
        raise unauthorized("claim exp is required", "malformed token")
    if ts >= exp + leeway:
        raise unauthorized("token expired", "token expired", code="expired")
    iat = _number(claims, "iat")
    if iat is None and require_iat:
        raise unauthorized("claim iat is required", "malformed token")
    if iat is not None and iat > ts + leeway:
        raise unauthorized("token issued in the future (iat)", "token not yet valid")
    nbf = _number(claims, "nbf")
    if nbf is not None and nbf > ts + leeway:
        raise unauthorized("token not yet valid (nbf)", "token not yet valid")
    return exp, iat


def audience_matches(claims: dict[str, Any], expected: str) -> bool:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return aud == expected
    return isinstance(aud, list) and expected in aud and all(isinstance(a, str) for a in aud)
