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
    for bad in ("2026-01-01", "ge9999-12-31T23:59:59-05:00", "ge0001-01-01T00:00:00+05:00", "ge2026-01-01T10:00"):
        r = await client.get("/fhir/AuditEvent", params={"date": bad})
        assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["date"], bad
    # a date alone is its day (UTC)
    today = read["recorded"][:10]
    day = [("patient", "p1"), ("date", f"ge{today}"), ("date", f"le{today}")]
    assert (await client.get("/fhir/AuditEvent", params=day)).json()["entry"]
    after = [("patient", "p1"), ("date", f"gt{today}")]
    assert (await client.get("/fhir/AuditEvent", params=after)).json()["entry"] == []
    # BALP: the server agent, and the request id as the transaction entity
    assert {a["type"]["coding"][0]["code"] for a in read["agent"]} == {"110153", "110152"}
    assert any(
        x.get("type", {}).get("code") == "XrequestId" and x["what"]["identifier"]["value"] for x in read["entity"]
    )
    r = await client.get("/fhir/AuditEvent", headers=bearer("system/Observation.read system/Patient.read"))
    assert r.status_code == 403
    r = await client.get("/fhir/AuditEvent", headers=bearer("system/AuditEvent.rs"))
    assert r.status_code == 200 and r.json()["entry"]
    # reading a patient's audit trail is itself an access to that patient's data
    r = await client.get("/fhir/AuditEvent", params={"patient": "Patient/p1", "date": "ge2026-01-01T00:00:00Z"})
    newest = r.json()["entry"][0]["resource"]
    assert newest["entity"][0]["what"]["reference"] == "Patient/p1" and "/fhir/AuditEvent" in repr(newest)


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
    from datetime import UTC, datetime

    from service.storage import outbox

    now = datetime.now(UTC)  # the audit trail's clock is the real one
    claims = outbox.claim(clean_engine, now, 1, 10, ["audit"])
    assert len(claims) == 2  # each forwarded row on its own: none waits behind another
    for c in claims:
        outbox.mark_failed(clean_engine, c, "test", now)  # back to pending, due now
    async with Worker(s, clean_engine) as worker:
        totals = await worker.drain()
    assert totals.delivered == 2 and totals.dead == 0, totals
    found = httpx.get(f"{srv.base_url}/AuditEvent", headers=srv.headers(), params={"_count": "100"}).json()
    events = [e["resource"] for e in found.get("entry", [])]
    assert sorted(e["outcome"] for e in events) == ["4", "4"]  # the 404 and the 401
    assert {e["subtype"][0]["code"] for e in events} == {"read"}
    assert any(x.get("what", {}).get("reference") == "Observation/not-there" for e in events for x in e["entity"])


async def test_an_unknown_forward_target_stops_the_start(settings) -> None:  # type: ignore[no-untyped-def]
    from service.api.app import create_app
    from service.security.errors import SecurityConfigError

    with pytest.raises(SecurityConfigError, match="IECTOX_AUDIT_FORWARD_TARGET"):
        create_app(settings.model_copy(update={"audit_forward_target": "nowhere", "auto_migrate": False}))
