"""The audit trail as FHIR AuditEvent resources (IHE BALP pattern), searchable by patient and
date under its own scope, valid for fhir.resources and both npm validators."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests import factories as f
from tests.auth import bearer
from tests.fhir_validators import assert_valid_fhir

pytestmark = pytest.mark.asyncio


async def test_audit_events_of_a_patient(client: httpx.AsyncClient) -> None:
    resources = [f.patient("p1"), f.temperature(38.6, "2026-01-06T10:00:00+00:00", id="t1", subject="Patient/p1")]
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources
    ]
    body = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert (
        await client.post("/fhir", content=body, headers={"Content-Type": "application/fhir+json"})
    ).status_code == 200
    assert (await client.get("/fhir/Observation/t1")).status_code == 200
    assert (await client.get("/fhir/Patient/p1", headers={"Authorization": "Bearer bad"})).status_code == 401
    r = await client.get("/fhir/AuditEvent", params={"patient": "Patient/p1"})
    assert r.status_code == 200, r.text
    events = [e["resource"] for e in r.json()["entry"]]
    read = next(e for e in events if e["subtype"][0]["code"] == "read" and e["outcome"] == "0")
    assert read["action"] == "R"
    assert {x.get("what", {}).get("reference") for x in read["entity"]} >= {"Patient/p1", "Observation/t1"}
    assert read["agent"][0]["who"]["display"] == "https://idp.iectox.test test-client" and read["agent"][0]["requestor"]
    rejected = next(e for e in events if e["outcome"] == "4")
    assert rejected["agent"][0]["who"]["display"] == "anonymous"
    assert_valid_fhir(events)
    # by date, and its own scope
    r = await client.get("/fhir/AuditEvent", params=[("patient", "p1"), ("date", "ge2100-01-01T00:00:00Z")])
    assert r.json()["entry"] == []
    r = await client.get("/fhir/AuditEvent", params={"date": "2026-01-01"})
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["date"]
    r = await client.get("/fhir/AuditEvent", headers=bearer("system/Observation.read system/Patient.read"))
    assert r.status_code == 403
    r = await client.get("/fhir/AuditEvent", headers=bearer("system/AuditEvent.rs"))
    assert r.status_code == 200 and r.json()["entry"]
