"""FHIR Bulk Data export of stored results (`GET /fhir/$export`): the asynchronous kick-off (202 +
Content-Location), status polling, the manifest and NDJSON files, `_type` and `_since`, the SMART
scopes of reads, cancel, and a job that never finished. Against SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio
from sqlalchemy import Engine
from sqlmodel import Session

from service.storage.models import ExportJob
from tests import factories as f
from tests.auth import bearer
from tests.conftest import FIXED_NOW
from tests.fhir_validators import assert_valid_fhir

pytestmark = pytest.mark.asyncio
ASYNC = {"Prefer": "respond-async"}


async def _stored_evaluation(client: httpx.AsyncClient) -> tuple[str, int]:
    pid, resources, _ = f.synthetic_at_peak()
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources
    ]
    body = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    r = await client.post("/fhir", content=body, headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 200, r.text
    r = await client.post(f"/fhir/Patient/{pid}/$evaluate")
    assert r.status_code == 200, r.text
    n = sum(1 for e in r.json()["entry"] if e["resource"]["resourceType"] == "RiskAssessment")
    return pid, n


async def _export(client: httpx.AsyncClient, query: str = "", **headers: str) -> dict[str, Any]:
    r = await client.get(f"/fhir/$export{query}", headers={**ASYNC, **headers})
    assert r.status_code == 202, r.text
    status_url = r.headers["content-location"]
    assert status_url.startswith("http://iectox.test/fhir/$export-status/")
    r = await client.get(status_url.removeprefix("http://iectox.test"), headers=headers)
    assert r.status_code == 200, r.text  # the job ran after the kick-off's response
    manifest: dict[str, Any] = r.json()
    manifest["_status"] = status_url
    return manifest


@pytest.fixture
def roomy(settings):  # type: ignore[no-untyped-def]
    return settings.model_copy(update={"max_body_bytes": 20_000_000, "max_bundle_entries": 20_000})


@pytest_asyncio.fixture
async def bulk_client(roomy, clean_engine: Engine):  # type: ignore[no-untyped-def]
    from service.api.app import create_app

    app = create_app(roomy, engine=clean_engine, clock=lambda: FIXED_NOW)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://iectox.test", headers=bearer()
    ) as c:
        yield c


async def test_export_of_stored_results(bulk_client: httpx.AsyncClient) -> None:
    pid, n_ras = await _stored_evaluation(bulk_client)
    manifest = await _export(bulk_client)
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert manifest["transactionTime"] == (FIXED_NOW - timedelta(minutes=5)).isoformat()  # the overlap
    assert manifest["request"].endswith("/fhir/$export")
    by_type = {o["type"]: o for o in manifest["output"]}
    assert set(by_type) == {"RiskAssessment", "Provenance"}
    assert by_type["RiskAssessment"]["count"] == n_ras and by_type["Provenance"]["count"] == 1
    files = {}
    for out in manifest["output"]:
        r = await bulk_client.get(out["url"].removeprefix("http://iectox.test"))
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+ndjson")
        files[out["type"]] = [orjson.loads(line) for line in r.content.splitlines()]
        assert len(files[out["type"]]) == out["count"]
    stored = (await bulk_client.get("/fhir/RiskAssessment", params={"subject": pid, "_count": 1000})).json()
    assert sorted(ra["id"] for ra in files["RiskAssessment"]) == sorted(e["resource"]["id"] for e in stored["entry"])
    assert all(ra["meta"]["versionId"] for ra in files["RiskAssessment"])
    prov = files["Provenance"][0]
    targets = {t["reference"] for t in prov["target"]}
    assert_valid_fhir([prov, *[ra for ra in files["RiskAssessment"] if f"RiskAssessment/{ra['id']}" in targets]])
    # _type and _since
    only = await _export(bulk_client, "?_type=Provenance")
    assert [o["type"] for o in only["output"]] == ["Provenance"]
    assert (await _export(bulk_client, "?_since=2026-11-21T11:59:00Z"))["output"]  # stored at FIXED_NOW
    spaced = await _export(bulk_client, "?_outputFormat=application/fhir+ndjson")  # an unencoded +
    assert spaced["output"]
    assert (await _export(bulk_client, "?_since=2026-11-21T12:00:01%2B00:00"))["output"] == []
    # cancel / delete: the job and its files are gone
    status = manifest["_status"].removeprefix("http://iectox.test")
    assert (await bulk_client.delete(status)).status_code == 202
    assert (await bulk_client.get(status)).status_code == 404
    assert (await bulk_client.get(manifest["output"][0]["url"].removeprefix("http://iectox.test"))).status_code == 404


async def test_kick_off_errors_are_named(bulk_client: httpx.AsyncClient) -> None:
    cases = [
        ("", {}, "Prefer"),  # no Prefer: respond-async
        ("?_type=Observation", ASYNC, "_type"),
        ("?_since=yesterday", ASYNC, "_since"),
        ("?_since=2026-01-01T00:00:00", ASYNC, "_since"),
        ("?_outputFormat=text/csv", ASYNC, "_outputFormat"),
        ("?_typeFilter=RiskAssessment%3Fstatus%3Dfinal", ASYNC, "_typeFilter"),
        ("?patient=Patient/p1", ASYNC, "patient"),
    ]
    for query, headers, where in cases:
        r = await bulk_client.get(f"/fhir/$export{query}", headers=headers)
        assert r.status_code == 400, (query, r.text)
        assert r.json()["issue"][0]["expression"] == [where]
    lenient = {"Prefer": "respond-async, handling=lenient"}
    assert (await bulk_client.get("/fhir/$export?_elements=id", headers=lenient)).status_code == 202
    assert (await bulk_client.get("/fhir/$export-status/nope")).status_code == 404
    assert (await bulk_client.get("/fhir/$export-file/nope/RiskAssessment-1.ndjson")).status_code == 404


async def test_export_needs_read_on_what_it_exports(bulk_client: httpx.AsyncClient) -> None:
    await _stored_evaluation(bulk_client)
    only_ra = bearer("system/RiskAssessment.read")
    r = await bulk_client.get("/fhir/$export", headers={**ASYNC, **only_ra})
    assert r.status_code == 403 and "Provenance" in r.json()["issue"][0]["diagnostics"]
    manifest = await _export(bulk_client, "?_type=RiskAssessment", **only_ra)
    assert [o["type"] for o in manifest["output"]] == ["RiskAssessment"]
    assert (await bulk_client.get("/fhir/$export", headers={**ASYNC, "Authorization": ""})).status_code == 401


async def test_a_job_that_never_finished_reports_an_error(bulk_client: httpx.AsyncClient, clean_engine: Engine) -> None:
    mine = "https://idp.iectox.test test-client"  # the actor of the client's token (tests/auth.py)
    with Session(clean_engine) as s:
        for job_id, created in (("gone", FIXED_NOW - timedelta(hours=2)), ("running", FIXED_NOW)):
            s.add(
                ExportJob(
                    id=job_id, status="in-progress", types="RiskAssessment", request="x", actor=mine, created=created
                )
            )
        s.commit()
    r = await bulk_client.get("/fhir/$export-status/gone")
    assert r.status_code == 500 and "start a new one" in r.json()["issue"][0]["diagnostics"]
    r = await bulk_client.get("/fhir/$export-status/running")
    assert r.status_code == 202 and r.headers["x-progress"] == "in-progress"


async def test_only_the_client_that_started_a_job_sees_it(bulk_client: httpx.AsyncClient) -> None:
    await _stored_evaluation(bulk_client)
    manifest = await _export(bulk_client)
    status = manifest["_status"].removeprefix("http://iectox.test")
    file_url = manifest["output"][0]["url"].removeprefix("http://iectox.test")
    other = bearer(sub="another-client")
    for method, url in (("GET", status), ("GET", file_url), ("DELETE", status)):
        r = await bulk_client.request(method, url, headers=other)
        assert r.status_code == 404, (method, url, r.text)
    assert (await bulk_client.get(file_url)).status_code == 200  # still there for its owner
