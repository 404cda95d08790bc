"""End to end (issue 5 acceptance): a synthetic CRS patient on a real FHIR server, a signed
patient-view hook with a partial prefetch, the rest fetched over SMART Backend Services, a
critical card at the grade the stateless evaluator gives, the write-back delivered by the
worker, validated, and no duplicates after the hook runs again.

The service runs in process (httpx ASGITransport); the EHR is the Medplum test server
(tests/fhir_server.py) over loopback HTTP with SMART auth. Nothing mocks HTTP.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, update
from sqlmodel import Session, select

from service.api.app import create_app
from service.app.evaluate import evaluate_body
from service.cdshooks.cards import PATIENT_VIEW
from service.codebook import load_codebook
from service.config.settings import Settings
from service.core.astct import CRS_METHOD, ICANS_METHOD
from service.ehr.worker import Worker
from service.fhir.writeback import writeback_id_system
from service.storage.models import OutboxRow
from tests import factories as f
from tests.auth import jwks, sign
from tests.fhir_server import FhirTestServer
from tests.fhir_validators import assert_valid_fhir

pytestmark = pytest.mark.integration  # PostgreSQL, the Node FHIR server, CDS Hooks and the worker

EHR_ISS = "https://ehr.e2e.example"
EHR_KEY = ec.generate_private_key(ec.SECP384R1())
EHR_KID = "e2e-es384"
SERVICE_BASE = "http://iectox.test"
HOOK_URL = f"/cds-services/{PATIENT_VIEW}"


def cds_jwt() -> str:
    now = int(time.time())
    claims = {
        "iss": EHR_ISS,
        "sub": "ehr-cds",
        "aud": f"{SERVICE_BASE}{HOOK_URL}",
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    return sign(claims, EHR_KEY, "ES384", {"kid": EHR_KID})


def server_search(server: FhirTestServer, rtype: str, **params: str) -> list[dict[str, Any]]:
    resp = httpx.get(
        f"{server.base_url}/{rtype}", params={**params, "_count": "1000"}, headers=server.headers(), timeout=60
    )
    resp.raise_for_status()
    bundle = resp.json()
    assert not any(link.get("relation") == "next" for link in bundle.get("link") or [])
    return [e["resource"] for e in bundle.get("entry") or []]


async def fire_hook(svc: httpx.AsyncClient, pid: str, patient: dict[str, Any], fhir_base: str) -> list[dict[str, Any]]:
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_base,  # no fhirAuthorization: the service uses SMART Backend Services
        "context": {"userId": "Practitioner/e2e", "patientId": pid},
        "prefetch": {"patient": patient},  # partial: the rest comes from fhirServer
    }
    r = await svc.post(HOOK_URL, json=body, headers={"Authorization": f"Bearer {cds_jwt()}"})
    assert r.status_code == 200, r.text
    cards: list[dict[str, Any]] = r.json()["cards"]
    return cards


def outbox_rows(engine: Engine) -> list[OutboxRow]:
    with Session(engine) as s:
        return list(s.exec(select(OutboxRow)).all())


@pytest.mark.asyncio
async def test_patient_view_to_writeback_end_to_end(
    settings: Settings, clean_engine: Engine, fhir_server_clean: FhirTestServer
) -> None:
    # Write-back with the defaults: mode "conditional" (PUT RiskAssessment?identifier=<write-back
    # identifier>), in Bundles of at most 8 entries (Medplum runs conditional updates only in
    # transactions that small), each with a Provenance for its own RiskAssessments.
    server = fhir_server_clean
    s = settings.model_copy(
        update={
            "auth_cds_clients": {EHR_ISS: {"jwks": jwks((EHR_KEY, EHR_KID))}},
            "auth_public_base_url": SERVICE_BASE,
            "ehr_servers": {"default": server.server_config(server.client_es384)},
            "writeback_target": "default",
            "max_bundle_entries": 5000,
        }
    )
    assert (s.writeback_mode, s.writeback_max_bundle_entries) == ("conditional", 8)
    codebook = load_codebook(s.canonical_base, s.codebook_path)

    # 1) a synthetic patient with CRS on the EHR's FHIR server
    pid, resources, expected_peak = f.synthetic_at_peak(base=s.canonical_base)
    stored = server.seed(resources)
    assert len(stored) == len(resources)
    patient = next(r for r in stored if r["resourceType"] == "Patient")

    # what the stateless evaluator (`iectox evaluate`, POST /fhir/$evaluate) says of the same data
    body = orjson.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]})
    reference = evaluate_body(body, codebook, s, None, datetime.now(UTC))
    grades = {r.method: r.grade for r in reference.results}
    crs, icans = grades[CRS_METHOD], grades[ICANS_METHOD]
    assert crs == expected_peak and crs is not None and crs >= 3

    app = create_app(s, engine=clean_engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=SERVICE_BASE) as svc:
        # 2-3) the hook with a signed client JWT and a partial prefetch; the service fetches the rest
        (card,) = await fire_hook(svc, pid, patient, server.base_url)
        assert card["indicator"] == "critical"
        icans_text = f"grade {icans}" if icans is not None else "indeterminate"
        assert card["summary"].startswith(f"CRS grade {crs}, ICANS {icans_text}"), card["summary"]
        assert len(card["summary"]) < 140
        assert card["links"][0]["url"] == f"{SERVICE_BASE}/fhir/Patient/{pid}/$course"
        stats = server.stats()
        assert stats["tokens_issued"] >= 1  # SMART Backend Services, no fhirAuthorization
        fetched = {e["path"] for e in stats["log"] if e["method"] in ("GET", "POST") and e["status"] == 200}
        # The Observation search is a POST _search: the codebook's code list is longer than a GET allows.
        assert {"/fhir/Observation/_search", "/fhir/MedicationAdministration", "/fhir/Condition"} <= fetched
        first_rows = outbox_rows(clean_engine)
        assert len(first_rows) > 1 and all(r.status == "pending" for r in first_rows)  # one evaluation
        assert all(len(orjson.loads(r.body)["entry"]) <= 8 for r in first_rows)

        # 4) the worker writes RiskAssessments and Provenance back
        async with Worker(s, clean_engine) as worker:
            totals = await worker.drain()
        assert totals.delivered == len(first_rows) and totals.dead == 0 and totals.retried == 0, totals

        # 5) they are on the server, and valid FHIR R4 for both npm validators
        assessments = server_search(server, "RiskAssessment", subject=f"Patient/{pid}")
        assert assessments
        system = writeback_id_system(s.canonical_base)
        local_ids = sorted(
            i["value"] for ra in assessments for i in ra.get("identifier", []) if i.get("system") == system
        )
        assert len(local_ids) == len(set(local_ids)) == len(assessments)
        server_refs = {f"RiskAssessment/{ra['id']}" for ra in assessments}
        provenances = [
            p
            for p in server_search(server, "Provenance")
            if {t.get("reference") for t in p.get("target", [])} & server_refs
        ]
        assert len(provenances) == len(first_rows)  # one per Bundle
        targeted = sorted(t["reference"] for p in provenances for t in p["target"])
        # every RiskAssessment written back has exactly one Provenance, and every target is on the server
        assert targeted == sorted(server_refs)
        # the EHR now holds the current ASTCT CRS grade the card showed
        (current_crs,) = [
            ra
            for ra in assessments
            if ra["method"]["coding"][0]["code"] == CRS_METHOD and ra["code"]["coding"][0]["code"] == "current-grade"
        ]
        assert current_crs["prediction"][0]["outcome"]["coding"][0]["code"] == f"grade-{crs}"
        assert_valid_fhir([*assessments, *provenances])

        # 6) the hook again (a new jti): same data, same evaluation, nothing new to write back; the
        # card again (nothing changed, but a critical card is never kept quiet)
        (card2,) = await fire_hook(svc, pid, patient, server.base_url)
        assert (card2["indicator"], card2["summary"]) == (card["indicator"], card["summary"])
        assert len(outbox_rows(clean_engine)) == len(first_rows)
        async with Worker(s, clean_engine) as worker:
            assert (await worker.drain()).delivered == 0
        # and even a re-delivery of every Bundle (a worker that died after the POST) adds nothing
        with Session(clean_engine) as session:
            session.exec(update(OutboxRow).values(status="pending", claimed_until=None))  # type: ignore[call-overload]
            session.commit()
        async with Worker(s, clean_engine) as worker:
            assert (await worker.drain()).delivered == len(first_rows)
        again = server_search(server, "RiskAssessment", subject=f"Patient/{pid}")
        assert sorted(ra["id"] for ra in again) == sorted(ra["id"] for ra in assessments)
        assert {p["id"] for p in server_search(server, "Provenance")} == {p["id"] for p in provenances}
        for value in local_ids:
            hits = server_search(server, "RiskAssessment", identifier=f"{system}|{value}")
            assert len(hits) == 1, (value, len(hits))
