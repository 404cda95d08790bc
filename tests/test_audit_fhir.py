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


async def test_audit_events_are_forwarded_to_an_audit_repository(
    settings,
    clean_engine,
    fhir_server_clean,  # type: ignore[no-untyped-def]
) -> None:
    """IECTOX_AUDIT_FORWARD_TARGET: each access is queued as a FHIR AuditEvent in the same
    transaction as the audit row, and the write-back worker delivers it (the test FHIR server
    validates what it stores)."""
    from service.api.app import create_app
    from service.ehr.worker import Worker
    from tests.conftest import FIXED_NOW

    srv = fhir_server_clean
    s = settings.model_copy(
        update={
            "ehr_servers": {"audit": srv.server_config(srv.client_es384, scope="system/AuditEvent.c")},
            "audit_forward_target": "audit",
        }
    )
    app = create_app(s, engine=clean_engine, clock=lambda: FIXED_NOW)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
    ) as c:
        assert (await c.get("/fhir/Observation/not-there")).status_code == 404
        assert (await c.get("/fhir/Patient/p9", headers={"Authorization": "Bearer bad"})).status_code == 401
    async with Worker(s, clean_engine) as worker:
        totals = await worker.drain()
    assert totals.delivered == 2 and totals.dead == 0, totals
    found = httpx.get(f"{srv.base_url}/AuditEvent", headers=srv.headers(), params={"_count": "100"}).json()
    events = [e["resource"] for e in found.get("entry", [])]
    assert sorted(e["outcome"] for e in events) == ["4", "4"]  # the 404 and the 401
    assert {e["subtype"][0]["code"] for e in events} == {"read"}
    assert any(x.get("what", {}).get("reference") == "Observation/not-there" for e in events for x in e["entity"])
