"""Inbound security: bearer JWTs and SMART scopes on /fhir, dev mode, the audit trail, and the
CDS Hooks client JWT verifier. Keys are real (cryptography), generated here and in tests/auth.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlmodel import Session

from service.api.app import create_app
from service.api.auth import CdsClientDep
from service.config.settings import Settings
from service.security import AuthError, SecurityConfigError, verify_cds_jwt
from service.security.cds import CdsTrust
from service.security.jwks import JwksError, KeyCache, parse_jwks
from service.security.scopes import Principal, parse_scopes
from service.storage import repository
from service.storage.models import AuditEvent
from tests import auth
from tests import factories as f
from tests.api_helpers import AT, crs3_resources, transaction
from tests.conftest import FIXED_NOW

CLI = [sys.executable, "-m", "service.cli"]
ACTOR = f"{auth.ISSUER} test-client"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}.{_b64(signature)}"


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": auth.ISSUER, "sub": "test-client", "aud": auth.AUDIENCE, "iat": now, "exp": now + 300}
    claims["scope"] = auth.ALL_SCOPES
    return {**claims, **over}


@pytest_asyncio.fixture
async def anon(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The same app as `client`, without a token."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://iectox.test") as c:
        yield c


def _audit(engine: Engine) -> list[AuditEvent]:
    with Session(engine) as s:
        return list(reversed(repository.audit_events(s, limit=1000)))


def assert_rejected(r: httpx.Response, status: int, words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/fhir+json"
    oo: dict[str, Any] = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert words in oo["issue"][0]["diagnostics"], oo
    assert r.headers["www-authenticate"].startswith('Bearer realm="iectox"')
    return oo


# --- 401: missing or bad tokens --------------------------------------------------------------


@pytest.mark.asyncio
async def test_no_token_is_401(anon: httpx.AsyncClient) -> None:
    oo = assert_rejected(await anon.get("/fhir/RiskAssessment"), 401, "bearer token is required")
    assert oo["issue"][0]["code"] == "login"
    assert_rejected(await anon.post("/fhir/$evaluate", content=f.body(*crs3_resources())), 401, "bearer token")
    r = await anon.get("/fhir/RiskAssessment", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert_rejected(r, 401, "must be 'Bearer <token>'")


@pytest.mark.asyncio
async def test_wrong_issuer_is_401(client: httpx.AsyncClient) -> None:
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(iss="https://evil.example"))
    assert_rejected(r, 401, "issuer")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


@pytest.mark.asyncio
async def test_expired_token_is_401(client: httpx.AsyncClient) -> None:
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(now=time.time() - 7200))
    oo = assert_rejected(r, 401, "expired")
    assert oo["issue"][0]["code"] == "expired"
    # within the leeway (60 s) an expired token still passes
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(now=time.time() - 3630))
    assert r.status_code == 200


@pytest.mark.asyncio
async def test_token_from_the_future_is_401(client: httpx.AsyncClient) -> None:
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(nbf=int(time.time()) + 600))
    assert_rejected(r, 401, "not yet valid")


@pytest.mark.asyncio
async def test_wrong_audience_is_401(client: httpx.AsyncClient) -> None:
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(aud="https://other-service.example/fhir"))
    assert_rejected(r, 401, "audience")
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(aud=["https://x.example", auth.AUDIENCE]))
    assert r.status_code == 200


@pytest.mark.asyncio
async def test_bad_signature_is_401(client: httpx.AsyncClient) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    forged = jwt.encode(_claims(), other, algorithm="ES384", headers={"kid": auth.KID})
    assert_rejected(
        await client.get("/fhir/RiskAssessment", headers={"Authorization": f"Bearer {forged}"}), 401, "signature"
    )
    good = auth.token()
    head, _, sig = good.split(".")
    tampered = f"{head}.{_b64(orjson.dumps(_claims(sub='someone-else')))}.{sig}"
    r = await client.get("/fhir/RiskAssessment", headers={"Authorization": f"Bearer {tampered}"})
    assert_rejected(r, 401, "signature")


@pytest.mark.asyncio
async def test_unknown_kid_is_401(client: httpx.AsyncClient) -> None:
    token = jwt.encode(_claims(), auth.KEY, algorithm="ES384", headers={"kid": "rotated-away"})
    r = await client.get("/fhir/RiskAssessment", headers={"Authorization": f"Bearer {token}"})
    assert_rejected(r, 401, "no trusted key")


@pytest.mark.asyncio
async def test_alg_none_is_401(client: httpx.AsyncClient) -> None:
    token = _unsigned({"alg": "none", "typ": "JWT", "kid": auth.KID}, _claims())
    r = await client.get("/fhir/RiskAssessment", headers={"Authorization": f"Bearer {token}"})
    assert_rejected(r, 401, "'none' not accepted")


@pytest.mark.asyncio
async def test_hs256_is_401(client: httpx.AsyncClient) -> None:
    token = jwt.encode(_claims(), "a-shared-secret-of-32-bytes-or-more!", algorithm="HS256", headers={"kid": auth.KID})
    r = await client.get("/fhir/RiskAssessment", headers={"Authorization": f"Bearer {token}"})
    assert_rejected(r, 401, "'HS256' not accepted")
    # key confusion: HMAC keyed with the issuer's public key (which an attacker knows)
    pem = auth.KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(orjson.dumps({"alg": "HS384", "kid": auth.KID}))
    body = _b64(orjson.dumps(_claims()))
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha384).digest()
    r = await client.get("/fhir/RiskAssessment", headers={"Authorization": f"Bearer {head}.{body}.{_b64(sig)}"})
    assert_rejected(r, 401, "'HS384' not accepted")


@pytest.mark.asyncio
@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 20_000, "e30.e30.e30"])
async def test_malformed_tokens_are_401(client: httpx.AsyncClient, token: str) -> None:
    r = await client.get("/fhir/RiskAssessment", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.asyncio
async def test_token_without_subject_is_401(client: httpx.AsyncClient) -> None:
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(sub=None))
    assert_rejected(r, 401, "subject")
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(sub=None, client_id="backend-app"))
    assert r.status_code == 200


# --- 403: scopes -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_insufficient_scope_is_403(client: httpx.AsyncClient) -> None:
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer("system/Observation.read"))
    oo = assert_rejected(r, 403, "do not allow read on RiskAssessment")
    assert oo["issue"][0]["code"] == "forbidden"
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert 'scope="system/RiskAssessment.rs"' in r.headers["www-authenticate"]


@pytest.mark.asyncio
async def test_read_scope_cannot_write(client: httpx.AsyncClient) -> None:
    r = await client.put("/fhir/Patient/p1", content=orjson.dumps(f.patient()), headers=auth.bearer("system/*.read"))
    assert_rejected(r, 403, "do not allow write on Patient")
    r = await client.post("/fhir/Patient/p1/$evaluate", headers=auth.bearer("system/*.rs"))
    assert_rejected(r, 403, "do not allow write on RiskAssessment")


@pytest.mark.asyncio
async def test_write_scope_cannot_read(client: httpx.AsyncClient) -> None:
    await client.put("/fhir/Patient/p1", content=orjson.dumps(f.patient()))
    assert_rejected(await client.get("/fhir/Patient/p1", headers=auth.bearer("system/*.cu")), 403, "read on Patient")


@pytest.mark.asyncio
async def test_patient_scopes_are_not_accepted(client: httpx.AsyncClient) -> None:
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer("patient/*.read launch/patient"))
    assert_rejected(r, 403, "patient/ scopes are not accepted")


@pytest.mark.asyncio
async def test_transaction_needs_write_on_every_type(client: httpx.AsyncClient) -> None:
    body = orjson.dumps(transaction(crs3_resources()))
    r = await client.post("/fhir", content=body, headers=auth.bearer("system/Patient.write system/Observation.write"))
    assert_rejected(r, 403, "do not allow write on MedicationAdministration")
    scopes = "system/Patient.c system/Observation.cu system/MedicationAdministration.u"
    r = await client.post("/fhir", content=body, headers=auth.bearer(scopes))
    assert r.status_code == 200, r.text


READ_SCOPES = [
    "system/RiskAssessment.read",  # v1
    "system/*.read",
    "user/RiskAssessment.read",
    "system/RiskAssessment.*",
    "system/RiskAssessment.rs",  # v2
    "system/RiskAssessment.s",
    "user/*.r",
    "system/*.cruds",
    "openid fhirUser system/RiskAssessment.rs",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("scope", READ_SCOPES)
async def test_v1_and_v2_read_scopes_accepted(client: httpx.AsyncClient, scope: str) -> None:
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(scope))
    assert r.status_code == 200, r.text


WRITE_SCOPES = [
    "system/Patient.write",  # v1
    "system/*.write",
    "user/Patient.*",
    "system/Patient.cu",  # v2
    "system/Patient.c",
    "system/Patient.u",
    "user/*.cruds",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("scope", WRITE_SCOPES)
async def test_v1_and_v2_write_scopes_accepted(client: httpx.AsyncClient, scope: str) -> None:
    r = await client.put("/fhir/Patient/p1", content=orjson.dumps(f.patient()), headers=auth.bearer(scope))
    assert r.status_code in (200, 201), r.text


@pytest.mark.asyncio
async def test_scp_claim_accepted(client: httpx.AsyncClient) -> None:
    r = await client.get("/fhir/RiskAssessment", headers=auth.bearer(None, scp=["system/RiskAssessment.rs"]))
    assert r.status_code == 200


@pytest.mark.asyncio
async def test_stateless_evaluate_needs_observation_read(client: httpx.AsyncClient) -> None:
    body = f.body(*crs3_resources())
    r = await client.post(
        "/fhir/$evaluate", content=body, params={"at": AT}, headers=auth.bearer("system/Observation.rs")
    )
    assert r.status_code == 200, r.text
    r = await client.post("/fhir/$evaluate", content=body, headers=auth.bearer("system/RiskAssessment.cruds"))
    assert_rejected(r, 403, "read on Observation")


def test_scope_parsing() -> None:
    grants = parse_scopes(
        "system/Observation.rs user/*.read patient/Patient.r system/Foo.x launch openid "
        "system/Observation.rs?category=vital-signs"
    )
    assert [(g.context, g.resource, "".join(sorted(g.perms))) for g in grants] == [
        ("system", "Observation", "rs"),
        ("user", "*", "rs"),
        ("patient", "Patient", "r"),
    ]
    p = Principal("x", grants)
    assert p.allows("read", "Observation") and p.allows("read", "RiskAssessment")
    assert not p.allows("write", "Observation") and p.allows("read", "Patient")
    assert not Principal("x", parse_scopes("system/Observation.d")).allows("write", "Observation")
    assert parse_scopes(None) == () and parse_scopes(42) == ()


# --- open endpoints --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_metadata_and_health_stay_open(anon: httpx.AsyncClient, clean_engine: Engine) -> None:
    assert (await anon.get("/fhir/metadata")).status_code == 200
    assert (await anon.get("/healthz")).status_code == 200
    assert (await anon.get("/readyz")).status_code == 200
    assert _audit(clean_engine) == []  # the CapabilityStatement is public and not audited


# --- audit trail -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_audit_rows_for_allowed_and_rejected_requests(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, clean_engine: Engine
) -> None:
    assert (await client.put("/fhir/Patient/p1", content=orjson.dumps(f.patient()))).status_code == 201
    obs = f.temperature(38.6, AT, subject="Patient/p1")
    r = await client.post("/fhir/Observation", content=orjson.dumps(obs))
    assert r.status_code == 201
    obs_id = r.json()["id"]
    assert (await client.get(f"/fhir/Observation/{obs_id}")).status_code == 200
    assert (await client.get("/fhir/RiskAssessment", params={"subject": "Patient/p1"})).status_code == 200
    assert (await anon.get("/fhir/Patient/p1")).status_code == 401
    assert (await client.get("/fhir/Patient/p1", headers=auth.bearer("system/Observation.rs"))).status_code == 403
    assert (await client.post("/fhir/Patient/p1/$evaluate", params={"at": AT})).status_code == 200
    rows = [
        (e.actor, e.action, e.route, e.resource_type, e.resource_id, e.patient_id, e.status)
        for e in _audit(clean_engine)
    ]
    assert rows == [
        (ACTOR, "update", "/fhir/Patient/{rid}", "Patient", "p1", "p1", 201),
        (ACTOR, "create", "/fhir/Observation", "Observation", obs_id, "p1", 201),
        (ACTOR, "read", "/fhir/Observation/{rid}", "Observation", obs_id, "p1", 200),
        (ACTOR, "search", "/fhir/RiskAssessment", "RiskAssessment", None, "p1", 200),
        ("anonymous", "read", "/fhir/Patient/{rid}", "Patient", "p1", "p1", 401),
        (ACTOR, "read", "/fhir/Patient/{rid}", "Patient", "p1", "p1", 403),
        (ACTOR, "evaluate", "/fhir/Patient/{patient_id}/$evaluate", "Patient", "p1", "p1", 200),
    ]
    assert all(e.recorded is not None for e in _audit(clean_engine))


@pytest.mark.asyncio
async def test_audit_survives_a_rolled_back_request(client: httpx.AsyncClient, clean_engine: Engine) -> None:
    bad = crs3_resources()
    bad[2] = f.temperature(38.6, AT, unit="K", id="temp1")  # unknown unit: 422, nothing stored
    r = await client.post("/fhir", content=orjson.dumps(transaction(bad)))
    assert r.status_code == 422
    [event] = _audit(clean_engine)
    assert (event.actor, event.action, event.route, event.status) == (ACTOR, "transaction", "/fhir", 422)
    assert (await client.get("/fhir/Patient/p1")).status_code == 404  # the request itself rolled back


@pytest.mark.asyncio
async def test_application_log_has_no_patient_ids_with_auth(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await anon.get("/fhir/Patient/MRN-SECRET-9")
    await client.get("/fhir/Patient/MRN-SECRET-9", headers=auth.bearer("system/Observation.rs"))
    await client.get("/fhir/Patient/MRN-SECRET-9")
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert "MRN-SECRET-9" not in text


# --- start-up and dev mode -------------------------------------------------------------------


def test_jwt_mode_without_issuer_refuses_to_start() -> None:
    with pytest.raises(SecurityConfigError, match=r"IECTOX_AUTH_ISSUER.*IECTOX_AUTH_AUDIENCE.*IECTOX_AUTH_JWKS"):
        create_app(Settings(database_url="sqlite://"))


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"auth_algorithms": ("RS384", "HS256")}, "HS256"),
        ({"auth_algorithms": ("none",)}, "none"),
        ({"auth_jwks": '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'}, "no usable public"),
        ({"auth_jwks": "not json"}, "not JSON"),
        ({"auth_jwks": None, "auth_jwks_path": Path("/nonexistent/jwks.json")}, "cannot read"),
        ({"auth_jwks_url": "http://idp.example/jwks"}, "https"),
        ({"auth_cds_clients": {"https://ehr.example": {}}}, "give its keys"),
        ({"auth_cds_clients": {"https://ehr.example": {"jku_prefixes": ["http://ehr.example/"]}}}, "https"),
        (
            {"auth_cds_clients": {"https://ehr.example": {"jwks": auth.jwks()}}},
            "IECTOX_AUTH_PUBLIC_BASE_URL is required",
        ),
    ],
)
def test_bad_security_settings_refuse_to_start(extra: dict[str, Any], words: str) -> None:
    with pytest.raises(SecurityConfigError, match=words):
        create_app(Settings(database_url="sqlite://", **{**auth.auth_settings(), **extra}))


def test_private_key_in_jwks_refused() -> None:
    key = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(auth.KEY))
    with pytest.raises(SecurityConfigError, match="private key"):
        create_app(
            Settings(database_url="sqlite://", **{**auth.auth_settings(), "auth_jwks": json.dumps({"keys": [key]})})
        )


def test_dev_mode_on_all_interfaces_refuses_to_start() -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3", "iectox.example.org"):  # noqa: S104
        with pytest.raises(SecurityConfigError, match="loopback"):
            create_app(Settings(database_url="sqlite://", auth_mode="dev", host=host))


def _serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "IECTOX_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}", **env}
    return subprocess.run([*CLI, "serve", *args], capture_output=True, text=True, env=full, timeout=60, check=False)


@pytest.mark.integration  # runs the CLI
def test_cli_serve_dev_mode_on_0_0_0_0_exits_non_zero(tmp_path: Path) -> None:
    out = _serve(tmp_path, "--host", "0.0.0.0", "--port", "1", IECTOX_AUTH_MODE="dev")  # noqa: S104
    assert out.returncode == 2
    assert "refusing to start" in out.stderr and "loopback" in out.stderr
    out = _serve(tmp_path, "--port", "1", IECTOX_AUTH_MODE="dev", IECTOX_HOST="0.0.0.0")  # noqa: S104
    assert out.returncode == 2 and "loopback" in out.stderr


@pytest.mark.integration  # runs the CLI
def test_cli_serve_jwt_mode_without_keys_exits_non_zero(tmp_path: Path) -> None:
    out = _serve(tmp_path, "--port", "1")
    assert out.returncode == 2
    assert "IECTOX_AUTH_ISSUER" in out.stderr


@pytest.mark.asyncio
async def test_dev_mode_needs_no_token(clean_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="iectox.security")
    app = create_app(Settings(database_url="sqlite://", auth_mode="dev"), engine=clean_engine, clock=lambda: FIXED_NOW)
    assert any(r.levelno == logging.WARNING and "dev" in r.getMessage() for r in caplog.records)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
        r = await c.put("/fhir/Patient/p1", content=orjson.dumps(f.patient()))
        assert r.status_code == 201
        assert (await c.get("/fhir/Patient/p1")).status_code == 200
    assert {e.actor for e in _audit(clean_engine)} == {"dev"}
    remote = httpx.ASGITransport(app=app, client=("10.0.0.5", 40000))
    async with httpx.AsyncClient(transport=remote, base_url="http://iectox.test") as c:
        assert_rejected(await c.get("/fhir/Patient/p1"), 401, "loopback clients only")


# --- CDS Hooks client JWTs -------------------------------------------------------------------

EHR = "https://ehr.example.org"
EHR2 = "https://ehr2.example.org"
SERVICE_URL = "https://iectox.example.org/cds-services/iectox-patient-view"
NOW = datetime.now(UTC).replace(microsecond=0)
EHR_KEY = ec.generate_private_key(ec.SECP384R1())
EHR2_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JKU = f"{EHR2}/jwks/keys.json"


def _cds_settings() -> Settings:
    return Settings(
        database_url="sqlite://",
        auth_mode="dev",
        auth_cds_clients={
            EHR: {"jwks": auth.jwks((EHR_KEY, "ehr-1"))},
            EHR2: {"jku_prefixes": [f"{EHR2}/jwks/"]},
        },
    )


class FakeFetch:
    """Stands in for httpx: serves EHR2's JWKS at JKU, counts fetches."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        if url != JKU:
            raise JwksError("HTTP 404")
        return orjson.dumps(auth.jwks((EHR2_KEY, "ehr2-1")))


def _cds_token(
    key: Any = EHR_KEY,
    alg: str = "ES384",
    kid: str | None = "ehr-1",
    jku: str | None = None,
    **over: Any,
) -> str:
    t = int(NOW.timestamp())
    claims = {"iss": EHR, "aud": SERVICE_URL, "iat": t, "exp": t + 300, "jti": str(uuid.uuid4()), "sub": "client-1"}
    claims.update(over)
    headers: dict[str, Any] = {"kid": kid} if kid else {}
    if jku:
        headers["jku"] = jku
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=alg, headers=headers)


def _verify(token: str, engine: Engine, fetch: FakeFetch | None = None) -> Any:
    settings = _cds_settings()
    trust = CdsTrust.from_settings(settings, KeyCache(300, fetch or FakeFetch()))
    with Session(engine) as session:
        client = verify_cds_jwt(token, SERVICE_URL, settings, session, NOW, trust=trust)
        session.commit()
    return client


def _cds_rejected(token: str, engine: Engine, words: str) -> None:
    with pytest.raises(AuthError) as err:
        _verify(token, engine)
    assert err.value.status == 401 and words in err.value.issues[0].diagnostics, err.value.issues


def test_cds_good_token(clean_engine: Engine) -> None:
    client = _verify(_cds_token(), clean_engine)
    assert (client.iss, client.sub, client.kid, client.actor) == (EHR, "client-1", "ehr-1", f"{EHR} client-1")


def test_cds_good_token_with_allowlisted_jku_rs384(clean_engine: Engine) -> None:
    fetch = FakeFetch()
    client = _verify(_cds_token(EHR2_KEY, "RS384", "ehr2-1", JKU, iss=EHR2), clean_engine, fetch)
    assert client.iss == EHR2 and fetch.urls == [JKU]


def test_cds_iss_not_allowlisted(clean_engine: Engine) -> None:
    _cds_rejected(_cds_token(iss="https://stranger.example"), clean_engine, "not an allowlisted CDS client")


def test_cds_jku_not_allowlisted(clean_engine: Engine) -> None:
    for jku in ("https://attacker.example/jwks.json", f"{EHR2}.attacker.example/jwks/keys.json", f"{EHR}/jwks/k.json"):
        _cds_rejected(_cds_token(EHR2_KEY, "RS384", "ehr2-1", jku, iss=EHR2), clean_engine, "jku is not allowlisted")
    # the EHR's own issuer has no jku prefixes at all
    _cds_rejected(_cds_token(jku=JKU), clean_engine, "jku is not allowlisted")


def test_cds_wrong_audience(clean_engine: Engine) -> None:
    _cds_rejected(_cds_token(aud="https://iectox.example.org/cds-services/other"), clean_engine, "audience")
    _cds_rejected(_cds_token(aud=SERVICE_URL + "/"), clean_engine, "audience")


def test_cds_expired(clean_engine: Engine) -> None:
    t = int(NOW.timestamp()) - 3600
    _cds_rejected(_cds_token(iat=t, exp=t + 300), clean_engine, "expired")


def test_cds_iat_required_and_lifetime_bounded(clean_engine: Engine) -> None:
    _cds_rejected(_cds_token(iat=None), clean_engine, "iat is required")
    _cds_rejected(_cds_token(exp=int(NOW.timestamp()) + 7200), clean_engine, "lifetime")


def test_cds_replayed_jti(clean_engine: Engine) -> None:
    token = _cds_token()
    _verify(token, clean_engine)
    _cds_rejected(token, clean_engine, "replayed")
    # the same jti from another issuer is another token
    _verify(
        _cds_token(
            EHR2_KEY,
            "RS384",
            "ehr2-1",
            JKU,
            iss=EHR2,
            jti=jwt.decode(token, options={"verify_signature": False})["jti"],
        ),
        clean_engine,
    )


def test_cds_jti_required(clean_engine: Engine) -> None:
    _cds_rejected(_cds_token(jti=None), clean_engine, "jti is required")


def test_cds_kid_required(clean_engine: Engine) -> None:
    _cds_rejected(_cds_token(kid=None), clean_engine, "kid header is required")


def test_cds_hs384(clean_engine: Engine) -> None:
    _cds_rejected(
        _cds_token("a-shared-secret-that-is-48-bytes-long-for-hs384!!", "HS384"), clean_engine, "'HS384' not accepted"
    )


def test_cds_none(clean_engine: Engine) -> None:
    t = int(NOW.timestamp())
    claims = {"iss": EHR, "aud": SERVICE_URL, "iat": t, "exp": t + 300, "jti": "j-none"}
    _cds_rejected(_unsigned({"alg": "none", "kid": "ehr-1"}, claims), clean_engine, "'none' not accepted")


def test_cds_es256_and_rs256_refused(clean_engine: Engine) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    _cds_rejected(_cds_token(p256, "ES256"), clean_engine, "'ES256' not accepted")
    _cds_rejected(_cds_token(EHR2_KEY, "RS256", "ehr2-1", JKU, iss=EHR2), clean_engine, "'RS256' not accepted")


def test_cds_bad_signature(clean_engine: Engine) -> None:
    _cds_rejected(_cds_token(ec.generate_private_key(ec.SECP384R1())), clean_engine, "signature")


@pytest.mark.asyncio
async def test_cds_client_dependency(clean_engine: Engine) -> None:
    app = create_app(_cds_settings(), engine=clean_engine)

    # (not the real hook's path: the CDS router, included first, would answer it)
    @app.post("/test-cds/iectox-patient-view")
    def hook(client: CdsClientDep) -> dict[str, str]:
        return {"actor": client.actor}

    base = "https://iectox.example.org"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base) as c:
        t = int(time.time())
        token = _cds_token(iat=t, exp=t + 300, aud=f"{base}/test-cds/iectox-patient-view")
        r = await c.post("/test-cds/iectox-patient-view", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == {"actor": f"{EHR} client-1"}
        r = await c.post("/test-cds/iectox-patient-view", headers={"Authorization": f"Bearer {token}"})
        assert_rejected(r, 401, "replayed")
        r = await c.post("/test-cds/iectox-patient-view")
        assert_rejected(r, 401, "bearer token is required")


# --- key sets --------------------------------------------------------------------------------


def test_key_cache_refetches_for_unknown_kid_but_rate_limited() -> None:
    clock = [0.0]
    fetch = FakeFetch()
    cache = KeyCache(300, fetch, min_refresh=30, clock=lambda: clock[0])
    assert cache.get(JKU, "ehr2-1").has_kid("ehr2-1")
    cache.get(JKU, "unknown")  # fetched 0 s ago: no refetch
    assert len(fetch.urls) == 1
    clock[0] = 31
    cache.get(JKU, "unknown")  # unknown kid after min_refresh: one refetch
    cache.get(JKU, "unknown")
    assert len(fetch.urls) == 2
    clock[0] = 400
    cache.get(JKU, "ehr2-1")  # past the ttl
    assert len(fetch.urls) == 3
    with pytest.raises(JwksError):
        cache.get("https://nowhere.example/jwks.json")


def test_parse_jwks_keeps_only_strong_public_signing_keys() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    doc = auth.jwks((EHR_KEY, "ec"), (EHR2_KEY, "rsa"), (weak, "weak"))
    doc["keys"].append({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"})
    doc["keys"].append({**auth.public_jwk(EHR_KEY, "enc"), "use": "enc"})
    keys = parse_jwks(doc)
    assert [k.kid for k in keys.keys] == ["ec", "rsa"]
    assert [k.kid for k in keys.candidates(None, "ES384")] == ["ec"]
    assert keys.candidates("ec", "ES256") == [] and keys.candidates("rsa", "RS384")
