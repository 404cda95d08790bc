"""service.ehr FhirClient against the REAL node FHIR server (tests/node/fhir-server.mjs).

Nothing here mocks HTTP: retries are exercised with the server's fault injection, and only the
client's sleep function, jitter source and clock are injected (so no test waits for backoff).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.config.settings import Settings
from service.ehr import (
    FhirAuthError,
    FhirClient,
    FhirConfigError,
    FhirHttpError,
    FhirServerConfig,
    FhirUnavailable,
    TokenCache,
    parse_retry_after,
    server_config,
)
from tests.fhir_server import FhirTestServer

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
TEMP = f"{LOINC}|8310-5"
HR = f"{LOINC}|8867-4"
CRP = f"{LOINC}|1988-5"
WRITE_SCOPE = "system/*.cruds"


class Sleeps:
    """Records the delays the client asks for, without waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.calls.append(delay)


@pytest.fixture
def srv(fhir_server_clean: FhirTestServer) -> FhirTestServer:
    return fhir_server_clean


def make_client(
    srv: FhirTestServer, sleeps: Sleeps | None = None, *, rand: float = 0.5, **overrides: Any
) -> FhirClient:
    cfg = srv.server_config(**({"backoff_base_s": 1.0, "backoff_max_s": 8.0} | overrides))
    return FhirClient(cfg, sleep=sleeps or Sleeps(), rand=lambda: rand)


def fhir_requests(srv: FhirTestServer, path: str | None = None) -> list[dict[str, Any]]:
    """The FHIR requests the server saw (SMART discovery excluded)."""
    return [
        e
        for e in srv.stats()["log"]
        if e["path"].startswith("/fhir/") and "/.well-known/" not in e["path"] and (path is None or e["path"] == path)
    ]


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "birthDate": "1970-01-01"}


def obs(pid: str, token: str, when: str, value: float = 1.0) -> dict[str, Any]:
    system, code = token.split("|")
    return {
        "resourceType": "Observation",
        "id": f"o-{uuid.uuid4().hex[:12]}",
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value},
    }


def med(pid: str, rxcui: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "id": f"m-{uuid.uuid4().hex[:12]}",
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": rxcui}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
    }


# ---- read / search ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_read_existing_and_missing(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    async with make_client(srv) as c:
        p = await c.read("Patient", "p1")
        assert p is not None and p["id"] == "p1"
        assert await c.read("Patient", "nope") is None
        with pytest.raises(ValueError, match="invalid resource id"):
            await c.read("Patient", "../Observation")


@pytest.mark.asyncio
async def test_search_follows_next_links_across_pages(srv: FhirTestServer) -> None:
    srv.seed(
        [
            patient("p1"),
            *[obs("p1", TEMP, f"2026-01-0{d}T08:00:00Z", d) for d in range(1, 8)],
            obs("p2", TEMP, "2026-01-01T08:00:00Z"),
        ]
    )
    async with make_client(srv) as c:
        found = await c.search("Observation", {"patient": "Patient/p1", "_count": "3", "_sort": "date"})
    assert [o["valueQuantity"]["value"] for o in found] == [1, 2, 3, 4, 5, 6, 7]
    assert len(fhir_requests(srv, "/fhir/Observation")) == 3  # pages of 3, 3, 1


@pytest.mark.asyncio
async def test_search_default_page_size_and_post_for_long_queries(srv: FhirTestServer) -> None:
    srv.seed([patient("p1"), *[obs("p1", TEMP, f"2026-01-0{d}T08:00:00Z") for d in range(1, 6)]])
    async with make_client(srv, page_size=2, max_get_query_chars=100) as c:
        codes = ",".join([TEMP, *[f"{LOINC}|0000-{i}" for i in range(10)]])
        found = await c.search("Observation", {"patient": "Patient/p1", "code": codes})
    assert len(found) == 5
    log = fhir_requests(srv)
    assert (log[0]["method"], log[0]["path"]) == ("POST", "/fhir/Observation/_search")
    assert len(log) == 3  # POST _search, then GET next links


@pytest.mark.asyncio
async def test_last_updated_incremental_read(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    async with make_client(srv, scope=WRITE_SCOPE) as c:
        old = await c.transaction(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {k: v for k, v in obs("p1", TEMP, "2026-01-01T08:00:00Z").items() if k != "id"},
                        "request": {"method": "POST", "url": "Observation"},
                    }
                ],
            }
        )
        checkpoint = old["entry"][0]["resource"]["meta"]["lastUpdated"]
        await asyncio.sleep(0.01)
        await c.transaction(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {k: v for k, v in obs("p1", HR, "2026-01-02T08:00:00Z").items() if k != "id"},
                        "request": {"method": "POST", "url": "Observation"},
                    }
                ],
            }
        )
        newer = await c.search("Observation", {"_lastUpdated": f"gt{checkpoint}"})
        data = await c.patient_data("p1", observation_codes=[TEMP, HR], last_updated_gt=checkpoint)
    assert [o["code"]["coding"][0]["code"] for o in newer] == ["8867-4"]
    assert sorted(r["resourceType"] for r in data) == ["Observation", "Patient"]


@pytest.mark.asyncio
async def test_patient_data_by_code_and_date(srv: FhirTestServer) -> None:
    srv.seed(
        [
            patient("p1"),
            obs("p1", TEMP, "2026-01-05T08:00:00Z", 39.0),
            obs("p1", HR, "2026-01-05T08:00:00+01:00", 120),
            obs("p1", TEMP, "2026-01-01T08:00:00Z", 37.0),  # before `since`
            obs("p1", f"{LOINC}|2160-0", "2026-01-05T08:00:00Z"),  # not a requested code
            obs("p2", TEMP, "2026-01-05T08:00:00Z"),  # another patient
            med("p1", "612865", "2025-12-30T08:00:00Z"),  # before `since`: still returned
            med("p2", "612865", "2026-01-05T08:00:00Z"),
            {
                "resourceType": "Condition",
                "id": "c1",
                "subject": {"reference": "Patient/p1"},
                "code": {"text": "DLBCL"},
            },
            {
                "resourceType": "Procedure",
                "id": "pr1",
                "status": "completed",
                "subject": {"reference": "Patient/p1"},
                "code": {"text": "CAR T infusion"},
                "performedDateTime": "2025-12-28T10:00:00Z",
            },
        ]
    )
    since = datetime(2026, 1, 3, tzinfo=UTC)
    async with make_client(srv) as c:
        data = await c.patient_data("p1", observation_codes=[TEMP, HR, CRP], since=since)
        nobody = await c.patient_data("missing", observation_codes=[TEMP])
        with pytest.raises(ValueError, match="timezone"):
            await c.patient_data("p1", observation_codes=[TEMP], since=datetime(2026, 1, 3))
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in data:
        by_type.setdefault(r["resourceType"], []).append(r)
    assert [p["id"] for p in by_type["Patient"]] == ["p1"]
    assert sorted(o["valueQuantity"]["value"] for o in by_type["Observation"]) == [39.0, 120]
    assert len(by_type["MedicationAdministration"]) == 1
    assert [r["id"] for r in by_type["Condition"]] == ["c1"]
    assert [r["id"] for r in by_type["Procedure"]] == ["pr1"]
    assert nobody == []


@pytest.mark.asyncio
async def test_patient_data_reads_the_referenced_medications(srv: FhirTestServer) -> None:
    """A MedicationAdministration by medicationReference: the Medication it names is fetched too
    (relative or absolute on this server); a contained one or one on another server is not."""
    by_ref = []
    for ref in ("Medication/ne-prod", f"{srv.base_url}/Medication/epi-ing", "#c", "https://other.example/Medication/x"):
        ma = med("p9", "7512", "2026-01-05T08:00:00Z")
        del ma["medicationCodeableConcept"]
        ma["medicationReference"] = {"reference": ref}
        by_ref.append(ma)
    srv.seed(
        [
            patient("p9"),
            *by_ref,
            {"resourceType": "Medication", "id": "ne-prod", "code": {"coding": [{"system": RXNORM, "code": "242969"}]}},
            {
                "resourceType": "Medication",
                "id": "epi-ing",
                "ingredient": [{"itemCodeableConcept": {"coding": [{"system": RXNORM, "code": "3992"}]}}],
            },
            {"resourceType": "Medication", "id": "unrelated", "code": {"text": "not referenced"}},
        ]
    )
    async with make_client(srv) as c:
        data = await c.patient_data("p9", observation_codes=[TEMP])
    assert sorted(r["id"] for r in data if r["resourceType"] == "Medication") == ["epi-ing", "ne-prod"]


# ---- retries ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_429_retry_after_seconds_is_honoured(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    srv.inject_fault(429, retry_after=7, count=2)
    sleeps = Sleeps()
    async with make_client(srv, sleeps) as c:
        assert (await c.read("Patient", "p1")) is not None
    assert sleeps.calls == [7.0, 7.0]
    assert [e["status"] for e in fhir_requests(srv)] == [429, 429, 200]


@pytest.mark.asyncio
async def test_429_retry_after_http_date_is_honoured(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    now = float(int(time.time()))
    srv.inject_fault(429, retry_after=email.utils.formatdate(now + 30, usegmt=True))
    sleeps = Sleeps()
    cfg = srv.server_config()
    async with FhirClient(cfg, sleep=sleeps, clock=lambda: now) as c:
        assert (await c.read("Patient", "p1")) is not None
    assert sleeps.calls == [30.0]


@pytest.mark.asyncio
async def test_retry_after_beyond_the_cap_gives_up_at_once(srv: FhirTestServer) -> None:
    srv.inject_fault(503, retry_after=3600)
    sleeps = Sleeps()
    async with make_client(srv, sleeps, retry_after_max_s=60) as c:
        with pytest.raises(FhirHttpError) as err:
            await c.read("Patient", "p1")
    assert (err.value.status, err.value.retryable, err.value.attempts) == (503, True, 1)
    assert sleeps.calls == []


@pytest.mark.asyncio
async def test_503_retried_with_jittered_backoff_then_success(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    srv.inject_fault(503, count=3)
    sleeps = Sleeps()
    async with make_client(srv, sleeps, rand=0.5, backoff_base_s=1.0, backoff_max_s=3.0) as c:
        assert (await c.read("Patient", "p1")) is not None
    # full jitter: rand * min(max, base * 2**n) = 0.5 * (1, 2, 3 (capped))
    assert sleeps.calls == [0.5, 1.0, 1.5]


@pytest.mark.asyncio
async def test_400_is_not_retried(srv: FhirTestServer) -> None:
    sleeps = Sleeps()
    async with make_client(srv, sleeps) as c:
        with pytest.raises(FhirHttpError) as err:
            await c.search("Observation", {"no-such-param": "x"})
    assert (err.value.status, err.value.retryable) == (400, False)
    assert err.value.outcome is not None and err.value.outcome["issue"][0]["code"] == "not-supported"
    assert "no-such-param" not in str(err.value)  # diagnostics stay out of the message
    assert sleeps.calls == []
    assert len(fhir_requests(srv)) == 1


@pytest.mark.asyncio
async def test_retries_exhausted(srv: FhirTestServer) -> None:
    srv.inject_fault(503, count=10)
    sleeps = Sleeps()
    async with make_client(srv, sleeps, max_retries=2) as c:
        with pytest.raises(FhirHttpError) as err:
            await c.search("Observation", {"patient": "Patient/p1"})
    assert (err.value.status, err.value.retryable, err.value.attempts) == (503, True, 3)
    assert len(sleeps.calls) == 2
    assert len(fhir_requests(srv)) == 3


@pytest.mark.asyncio
async def test_dropped_connections_and_timeouts_are_retried(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    srv.inject_fault(drop=True)
    srv.inject_fault(delay_ms=2000)  # then one slow answer: the client times out
    sleeps = Sleeps()
    async with make_client(srv, sleeps, timeout_s=0.5) as c:
        assert (await c.read("Patient", "p1")) is not None
    assert len(sleeps.calls) == 2

    srv.inject_fault(drop=True, count=5)
    async with make_client(srv, Sleeps(), max_retries=1) as c:
        with pytest.raises(FhirUnavailable) as err:
            await c.read("Patient", "p1")
    assert err.value.attempts == 2


@pytest.mark.asyncio
async def test_outage_restart_unavailable_then_recovers(srv: FhirTestServer) -> None:
    tokens = TokenCache()
    cfg = srv.server_config(max_retries=1)
    async with FhirClient(cfg, tokens=tokens, sleep=Sleeps()) as c:
        assert await c.search("Patient", {}) == []
        srv.stop()
        try:
            with pytest.raises(FhirUnavailable):
                await c.search("Patient", {})
        finally:
            srv.start()  # same port; data and issued tokens are gone
        srv.seed(patient("p1"))
        assert (await c.read("Patient", "p1")) is not None  # old token -> 401 -> new token
    assert srv.stats()["tokens_issued"] == 1  # since the restart


# ---- SMART ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_smart_token_obtained_once_and_cached(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    tokens = TokenCache()
    cfg = srv.server_config()
    async with FhirClient(cfg, tokens=tokens) as c1, FhirClient(cfg, tokens=tokens) as c2:
        await asyncio.gather(c1.read("Patient", "p1"), c2.read("Patient", "p1"), c1.search("Patient", {}))
        await c2.patient_data("p1", observation_codes=[TEMP])
    stats = srv.stats()
    assert (stats["token_requests"], stats["tokens_issued"]) == (1, 1)
    assert all(e["auth"] for e in fhir_requests(srv))
    discovery = [e for e in stats["log"] if e["path"].endswith("/.well-known/smart-configuration")]
    assert len(discovery) == 1


@pytest.mark.asyncio
async def test_token_refreshed_before_expiry(srv: FhirTestServer) -> None:
    srv.configure(token_lifetime_s=100)
    now = [1_000_000.0]
    async with FhirClient(srv.server_config(), clock=lambda: now[0]) as c:
        await c.search("Patient", {})
        now[0] += 45  # margin is min(60, 100/2) = 50 s: still cached
        await c.search("Patient", {})
        now[0] += 10
        await c.search("Patient", {})
    assert srv.stats()["tokens_issued"] == 2


@pytest.mark.asyncio
async def test_es384_client(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    async with FhirClient(srv.server_config(srv.client_es384)) as c:
        assert (await c.read("Patient", "p1")) is not None
    assert srv.stats()["tokens_issued"] == 1


@pytest.mark.asyncio
async def test_401_drops_the_token_and_retries_once(srv: FhirTestServer) -> None:
    async with FhirClient(srv.server_config()) as c:
        await c.search("Patient", {})
        srv.revoke_tokens()
        await c.search("Patient", {})
    assert srv.stats()["tokens_issued"] == 2
    assert [e["status"] for e in fhir_requests(srv)] == [200, 401, 200]


@pytest.mark.asyncio
async def test_unregistered_key_is_rejected_clearly(srv: FhirTestServer, tmp_path: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "other.pem"
    pem.write_bytes(
        other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    sleeps = Sleeps()
    async with FhirClient(srv.server_config(private_key_path=pem), sleep=sleeps) as c:
        with pytest.raises(FhirAuthError) as err:
            await c.read("Patient", "p1")
    assert (err.value.status, err.value.error, err.value.retryable) == (401, "invalid_client", False)
    assert "SMART authorization failed" in str(err.value)
    assert sleeps.calls == []
    stats = srv.stats()
    assert (stats["token_requests"], stats["fhir_requests"]) == (1, 0)


@pytest.mark.asyncio
async def test_key_that_does_not_match_alg_is_a_config_error(srv: FhirTestServer, tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP384R1())
    pem = tmp_path / "ec.pem"
    pem.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    async with FhirClient(srv.server_config(private_key_path=pem, alg="RS384")) as c:
        with pytest.raises(FhirConfigError, match="RS384 needs an RSA"):
            await c.read("Patient", "p1")
    async with FhirClient(srv.server_config(private_key_path=tmp_path / "absent.pem")) as c:
        with pytest.raises(FhirConfigError, match="cannot read"):
            await c.read("Patient", "p1")
    assert srv.stats()["token_requests"] == 0


@pytest.mark.asyncio
async def test_token_endpoint_errors_are_retried(srv: FhirTestServer) -> None:
    srv.inject_fault(503, target="token", count=2)
    sleeps = Sleeps()
    async with FhirClient(srv.server_config(), sleep=sleeps, rand=lambda: 0.0) as c:
        await c.search("Patient", {})
    assert len(sleeps.calls) == 2
    assert srv.stats()["tokens_issued"] == 1


@pytest.mark.asyncio
async def test_static_token_is_used_as_is(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    srv.add_static_token("cds-hooks-token", "system/Patient.rs")
    smart_cfg = srv.server_config()
    async with FhirClient(smart_cfg, token="cds-hooks-token") as c:  # noqa: S106  # token wins over SMART
        assert (await c.read("Patient", "p1")) is not None
    open_cfg = FhirServerConfig(base_url=srv.base_url)
    async with FhirClient(open_cfg, token="wrong-token") as c:  # noqa: S106
        with pytest.raises(FhirAuthError) as err:
            await c.read("Patient", "p1")
    assert err.value.status == 401
    async with FhirClient(open_cfg) as c:  # no auth at all against a server that needs it
        with pytest.raises(FhirHttpError) as plain:
            await c.read("Patient", "p1")
    assert plain.value.status == 401
    stats = srv.stats()
    assert stats["token_requests"] == 0
    assert [e["status"] for e in fhir_requests(srv)] == [200, 401, 401]


@pytest.mark.asyncio
async def test_insufficient_scope_is_not_retried(srv: FhirTestServer) -> None:
    sleeps = Sleeps()
    async with make_client(srv, sleeps, scope="system/Patient.rs") as c:
        with pytest.raises(FhirHttpError) as err:
            await c.search("Observation", {})
    assert (err.value.status, err.value.retryable) == (403, False)
    assert sleeps.calls == []


# ---- writes -----------------------------------------------------------------------------------


def _writeback(pid: str, ident: str, status: str) -> dict[str, Any]:
    urn = f"urn:uuid:{uuid.uuid4()}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": urn,
                "resource": {
                    "resourceType": "RiskAssessment",
                    "status": status,
                    "identifier": [{"system": "urn:iectox:test", "value": ident}],
                    "subject": {"reference": f"Patient/{pid}"},
                    "prediction": [{"qualitativeRisk": {"coding": [{"code": "low"}]}}],
                },
                "request": {"method": "PUT", "url": f"RiskAssessment?identifier=urn:iectox:test|{ident}"},
            },
            {
                "resource": {
                    "resourceType": "Provenance",
                    "target": [{"reference": urn}],
                    "recorded": "2026-01-01T00:00:00Z",
                    "agent": [{"who": {"display": "iectox"}}],
                },
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }


@pytest.mark.asyncio
async def test_conditional_update_via_transaction_twice_gives_one_resource(srv: FhirTestServer) -> None:
    srv.seed(patient("p1"))
    async with make_client(srv) as c:  # default scope: RiskAssessment.cu, Provenance.cu
        first = await c.transaction(_writeback("p1", "crs-p1", "preliminary"))
        second = await c.transaction(_writeback("p1", "crs-p1", "final"))
    # the write scope (RiskAssessment.cu) cannot search: look with a full-scope client
    async with FhirClient(srv.server_config(scope=WRITE_SCOPE)) as c:
        stored = await c.search("RiskAssessment", {"identifier": "urn:iectox:test|crs-p1"})
    assert first["type"] == second["type"] == "transaction-response"
    assert [e["response"]["status"] for e in first["entry"]] == ["201", "201"]
    assert [e["response"]["status"] for e in second["entry"]] == ["200", "201"]
    assert len(stored) == 1 and stored[0]["status"] == "final"
    assert first["entry"][0]["resource"]["id"] == stored[0]["id"]


@pytest.mark.asyncio
async def test_invalid_transaction_is_rejected_without_retry(srv: FhirTestServer) -> None:
    bundle = _writeback("p1", "x", "final")
    del bundle["entry"][1]["resource"]["recorded"]
    sleeps = Sleeps()
    async with make_client(srv, sleeps) as c:
        with pytest.raises(FhirHttpError) as err:
            await c.transaction(bundle)
        with pytest.raises(ValueError, match="transaction or batch"):
            await c.transaction({"resourceType": "Bundle", "type": "collection"})
    assert (err.value.status, err.value.retryable) == (400, False)
    assert sleeps.calls == []


# ---- configuration, logs, helpers -------------------------------------------------------------


def test_settings_parse_ehr_servers_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "IECTOX_EHR_SERVERS",
        '{"default": {"base_url": "https://ehr.example.org/fhir/", "client_id": "iectox", '
        '"private_key_path": "/keys/iectox.pem", "key_id": "k1", "alg": "ES384"}}',
    )
    settings = Settings()
    cfg = server_config(settings)
    assert cfg.base_url == "https://ehr.example.org/fhir" and cfg.alg == "ES384" and cfg.smart
    with pytest.raises(KeyError, match="other"):
        server_config(settings, "other")
    with pytest.raises(ValueError, match="both client_id"):
        FhirServerConfig(base_url="https://x.example", client_id="only-id")
    with pytest.raises(ValueError, match="absolute"):
        FhirServerConfig(base_url="ehr.example.org/fhir")


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("5", now) == 5.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 12, usegmt=True), now) == 12.0
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


@pytest.mark.asyncio
async def test_logs_never_carry_patient_ids_or_urls(srv: FhirTestServer, caplog: pytest.LogCaptureFixture) -> None:
    pid = "secret-patient-4711"
    srv.seed([patient(pid), obs(pid, TEMP, "2026-01-05T08:00:00Z", 39.4)])
    srv.inject_fault(503, count=2)
    srv.inject_fault(drop=True)
    caplog.set_level(logging.DEBUG, logger="iectox.ehr")
    async with make_client(srv) as c:
        await c.patient_data(pid, observation_codes=[TEMP], since=datetime(2026, 1, 1, tzinfo=UTC))
        with pytest.raises(FhirHttpError):
            await c.search("Observation", {"patient": f"Patient/{pid}", "bad-param": pid})
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("iectox.ehr"))
    assert "retry" in text  # the retries were logged ...
    for secret in (pid, "39.4", "127.0.0.1", "http"):
        assert secret not in text  # ... without ids, values or URLs
