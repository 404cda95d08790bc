"""The HTTP API over both databases: contract, storage semantics, and bad input."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, func
from sqlmodel import Session, select

from service.storage.models import EmittedResource, StoredResource
from tests import factories as f
from tests.api_helpers import AT, T0, crs3_resources, transaction
from tests.fhir_validators import assert_valid_fhir, assert_valid_r4b

pytestmark = pytest.mark.integration  # the API over SQLite and PostgreSQL

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def stored_count(engine: Engine) -> tuple[int, int]:
    with Session(engine) as s:
        a = s.exec(select(func.count()).select_from(StoredResource)).one()
        b = s.exec(select(func.count()).select_from(EmittedResource)).one()
    return int(a), int(b)


def assessments(bundle: dict[str, Any], code: str = "current-grade") -> dict[str, dict[str, Any]]:
    """The RiskAssessments of one code (current-grade or risk-score), by method."""
    out = {}
    for e in bundle["entry"]:
        r = e["resource"]
        if r["resourceType"] == "RiskAssessment" and r["code"]["coding"][0]["code"] == code:
            out[r["method"]["coding"][0]["code"]] = r
    return out


def all_assessment_ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "RiskAssessment"}


def outcome_code(ra: dict[str, Any]) -> str:
    return str(ra["prediction"][0]["outcome"]["coding"][0]["code"])


@pytest.mark.asyncio
async def test_evaluate_contract_and_validators(client: httpx.AsyncClient) -> None:
    r = await client.post("/fhir/$evaluate", content=f.body(*crs3_resources()), params={"at": AT}, headers=FHIR_JSON)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/fhir+json"
    doc = r.json()
    assert doc["resourceType"] == "Bundle" and doc["type"] == "collection"
    ras = assessments(doc)
    crs, icans = ras["astct-crs"], ras["astct-icans"]
    assert outcome_code(crs) == "grade-3"
    assert {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "D89.833"}.items() <= next(
        c for c in crs["prediction"][0]["outcome"]["coding"] if c["system"].endswith("icd-10-cm")
    ).items()
    assert outcome_code(icans) == "grade-1"
    assert any(c["code"] == "G92.01" for c in icans["prediction"][0]["outcome"]["coding"])
    for ra in (crs, icans):
        assert ra["status"] == "final"
        assert ra["subject"] == {"reference": "Patient/p1"}
        assert ra["occurrenceDateTime"] == AT
        assert ra["code"]["coding"][0]["code"] == "current-grade"
        assert ra["method"]["coding"][0]["system"] == "https://iectox.org/fhir/CodeSystem/method"
        assert ra["prediction"][0]["qualitativeRisk"]["coding"][0]["system"].endswith("risk-probability")
    basis = {b["reference"] for b in crs["basis"]}
    assert {"Observation/temp1", "MedicationAdministration/ne1"} <= basis
    assert "one vasopressor" in crs["prediction"][0]["rationale"]
    prov = next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Provenance")
    assert {t["reference"] for t in prov["target"]} == {f"RiskAssessment/{i}" for i in all_assessment_ids(doc)}
    entities = {e["what"]["reference"] for e in prov["entity"]}
    assert {"Patient/p1", "Observation/temp1", "Observation/ice1"} <= entities
    resources = [e["resource"] for e in doc["entry"]]
    assert_valid_r4b([doc, *resources])
    assert_valid_fhir([doc])


@pytest.mark.asyncio
async def test_evaluate_defaults_at_to_latest_input(client: httpx.AsyncClient) -> None:
    r = await client.post("/fhir/$evaluate", content=f.body(*crs3_resources()))
    ras = assessments(r.json())
    assert ras["astct-crs"]["occurrenceDateTime"] == T0


@pytest.mark.asyncio
async def test_indeterminate_names_missing_inputs(client: httpx.AsyncClient) -> None:
    body = f.body(f.patient(), f.bp_panel(120, 80, T0))
    doc = (await client.post("/fhir/$evaluate", content=body)).json()
    ras = assessments(doc)
    for ra in ras.values():
        assert outcome_code(ra) == "indeterminate"
        assert "qualitativeRisk" not in ra["prediction"][0]
    assert "body-temperature" in ras["astct-crs"]["prediction"][0]["outcome"]["text"]
    assert "ice-score" in ras["astct-icans"]["prediction"][0]["rationale"]
    assert_valid_fhir([doc])


BAD_INPUTS = [
    ("malformed-json", b'{"resourceType": "Bundle", ', 400, None),
    ("not-an-object", b"[1, 2]", 400, None),
    (
        "unknown-resourcetype",
        f.body(f.patient(), {"resourceType": "Observatoin", "id": "x"}),
        422,
        "Bundle.entry[1].resource.resourceType",
    ),
    (
        "missing-status",
        f.body(f.patient(), {k: v for k, v in f.temperature(38.5, T0).items() if k != "status"}),
        422,
        "Bundle.entry[1].resource.status",
    ),
    (
        "datetime-no-timezone",
        f.body(f.patient(), f.temperature(38.5, "2026-01-06T10:00:00")),
        422,
        "Bundle.entry[1].resource.effectiveDateTime",
    ),
    (
        "unknown-unit",
        f.body(f.patient(), f.temperature(38.5, T0, unit="K")),
        422,
        "Bundle.entry[1].resource.valueQuantity.code",
    ),
    (
        "quantity-without-unit",
        f.body(f.patient(), f.observation(f.TEMPERATURE, T0, valueQuantity={"value": 38.5})),
        422,
        "Bundle.entry[1].resource.valueQuantity.code",
    ),
    ("too-many-entries", f.body(f.patient(), *[f.temperature(37, T0) for _ in range(310)]), 413, "Bundle.entry"),
    ("body-too-large", orjson.dumps({"resourceType": "Bundle", "type": "collection", "pad": "x" * 300_000}), 413, None),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("case", "body", "status", "expression"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
async def test_bad_input_gets_operation_outcome(
    client: httpx.AsyncClient, clean_engine: Engine, case: str, body: bytes, status: int, expression: str | None
) -> None:
    await client.post("/fhir", content=orjson.dumps(transaction(crs3_resources())))
    before = stored_count(clean_engine)
    for path in ("/fhir/$evaluate", "/fhir"):
        if path == "/fhir" and case not in ("malformed-json", "body-too-large"):
            continue
        # Strict handling: a resource the rules cannot use is a 422 (lenient, the default, leaves it out).
        r = await client.post(path, content=body, headers={**FHIR_JSON, "Prefer": "handling=strict"})
        assert r.status_code == status, r.text
        oo = r.json()
        assert oo["resourceType"] == "OperationOutcome"
        issue = oo["issue"][0]
        assert issue["severity"] == "error" and issue["diagnostics"]
        if expression:
            assert expression in issue["expression"]
    assert stored_count(clean_engine) == before


@pytest.mark.asyncio
async def test_transaction_is_atomic(client: httpx.AsyncClient, clean_engine: Engine) -> None:
    good = crs3_resources()
    bad = f.temperature(38.5, T0, unit="K", id="badtemp")
    r = await client.post("/fhir", content=orjson.dumps(transaction([*good, bad])))
    assert r.status_code == 422
    assert "Bundle.entry[7].resource.valueQuantity.code" in r.json()["issue"][0]["expression"]
    assert stored_count(clean_engine) == (0, 0)
    r = await client.post("/fhir", content=orjson.dumps(transaction(good)))
    assert r.status_code == 200
    assert [e["response"]["status"] for e in r.json()["entry"]] == ["201 Created"] * len(good)


@pytest.mark.asyncio
async def test_batch_stores_the_good_entries(client: httpx.AsyncClient, clean_engine: Engine) -> None:
    doc = transaction([f.patient(), f.temperature(38.5, T0, unit="K", id="badtemp")])
    doc["type"] = "batch"
    r = await client.post("/fhir", content=orjson.dumps(doc))
    assert r.status_code == 200
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == ["201 Created", "422 Unprocessable Entity"]
    assert stored_count(clean_engine) == (1, 0)


@pytest.mark.asyncio
async def test_writes_are_idempotent_on_id_and_version(client: httpx.AsyncClient) -> None:
    obs = f.temperature(38.5, T0, id="t-v")
    obs["meta"] = {"versionId": "2"}
    first = await client.put("/fhir/Observation/t-v", content=orjson.dumps(obs))
    assert first.status_code == 201 and first.headers["etag"] == 'W/"1"'
    again = await client.put("/fhir/Observation/t-v", content=orjson.dumps(obs))
    assert again.status_code == 200 and again.headers["etag"] == 'W/"1"'
    older = {**obs, "meta": {"versionId": "1"}, "valueQuantity": f.quantity(36.0, "Cel")}
    await client.put("/fhir/Observation/t-v", content=orjson.dumps(older))
    read = (await client.get("/fhir/Observation/t-v")).json()
    assert read["valueQuantity"]["value"] == 38.5  # the older version changed nothing
    newer = {**obs, "meta": {"versionId": "3"}, "valueQuantity": f.quantity(39.0, "Cel")}
    r = await client.put("/fhir/Observation/t-v", content=orjson.dumps(newer))
    assert r.headers["etag"] == 'W/"2"'
    assert (await client.get("/fhir/Observation/t-v")).json()["valueQuantity"]["value"] == 39.0


@pytest.mark.asyncio
async def test_put_rejects_bad_resource_without_change(client: httpx.AsyncClient) -> None:
    obs = f.temperature(38.5, T0, id="t-x")
    await client.put("/fhir/Observation/t-x", content=orjson.dumps(obs))
    bad = {**obs, "effectiveDateTime": "2026-01-06T10:00:00"}
    r = await client.put("/fhir/Observation/t-x", content=orjson.dumps(bad))
    assert r.status_code == 422
    assert r.json()["issue"][0]["expression"] == ["Observation.effectiveDateTime"]
    assert (await client.get("/fhir/Observation/t-x")).json()["effectiveDateTime"] == T0
    mismatch = await client.put("/fhir/Observation/other", content=orjson.dumps(obs))
    assert mismatch.status_code == 400


@pytest.mark.asyncio
async def test_stored_evaluation_updates_never_duplicates(client: httpx.AsyncClient, clean_engine: Engine) -> None:
    await client.post("/fhir", content=orjson.dumps(transaction(crs3_resources())))
    first = await client.post("/fhir/Patient/p1/$evaluate", params={"at": AT})
    assert first.status_code == 200
    second = await client.post("/fhir/Patient/p1/$evaluate", params={"at": AT})
    ids = lambda r: sorted(e["resource"]["id"] for e in r.json()["entry"])  # noqa: E731
    assert ids(first) == ids(second)
    assert stored_count(clean_engine)[1] == len(first.json()["entry"])  # RiskAssessments + 1 Provenance
    await client.post("/fhir/Patient/p1/$evaluate", params={"at": "2026-01-06T11:00:00+00:00"})
    search = (await client.get("/fhir/RiskAssessment", params={"subject": "Patient/p1", "_sort": "-date"})).json()
    assert search["type"] == "searchset"
    dates = [
        r.get("occurrenceDateTime") or r["occurrencePeriod"]["end"] for r in (e["resource"] for e in search["entry"])
    ]
    assert dates == sorted(dates, reverse=True)
    crs_only = (await client.get("/fhir/RiskAssessment", params={"subject": "p1", "method": "astct-crs"})).json()
    assert crs_only["total"] == 4  # current grade and maximum grade, at two evaluation times
    ra_id = search["entry"][0]["resource"]["id"]
    read = await client.get(f"/fhir/RiskAssessment/{ra_id}")
    assert read.status_code == 200 and read.json()["meta"]["versionId"] in ("1", "2")
    assert_valid_fhir([search])


@pytest.mark.asyncio
async def test_evaluate_unknown_patient_is_404(client: httpx.AsyncClient) -> None:
    r = await client.post("/fhir/Patient/nobody/$evaluate")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.asyncio
async def test_health_metadata_and_unknown_routes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ok"}
    cap = (await client.get("/fhir/metadata")).json()
    assert cap["fhirVersion"] == "4.0.1"
    assert_valid_fhir([cap])
    r = await client.get("/fhir/Nothing/here")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    r = await client.get("/fhir/RiskAssessment", params={"_count": "zero"})
    assert r.status_code == 400 and r.json()["issue"][0]["expression"]


JUNK = [
    b"",
    b"null",
    b"42",
    b'"text"',
    b'{"resourceType": 5}',
    b'{"resourceType": "Bundle", "type": "collection", "entry": [null, 3]}',
    b'{"resourceType": "Bundle", "type": "collection", "entry": {"a": 1}}',
    b'{"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {"resourceType": "Patient"},'
    b' "request": {"method": "DELETE", "url": "Patient/1"}}]}',
]


@pytest.mark.asyncio
@pytest.mark.parametrize("body", JUNK)
async def test_junk_never_500(client: httpx.AsyncClient, body: bytes) -> None:
    for path in ("/fhir/$evaluate", "/fhir", "/fhir/Observation", "/fhir/Patient/x"):
        r = await (client.put(path, content=body) if path.endswith("/x") else client.post(path, content=body))
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.asyncio
async def test_logs_carry_no_patient_identifiers_or_values(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    resources = crs3_resources()
    resources[0] = f.patient("MRN-SECRET-123")
    for r in resources[1:]:
        if "subject" in r:
            r["subject"] = {"reference": "Patient/MRN-SECRET-123"}
    await client.post("/fhir", content=orjson.dumps(transaction(resources)))
    await client.post("/fhir/Patient/MRN-SECRET-123/$evaluate", params={"at": AT})
    await client.post(
        "/fhir/$evaluate",
        content=f.body(
            f.patient("MRN-SECRET-123"), f.temperature(38.5, T0, unit="K", subject="Patient/MRN-SECRET-123")
        ),
    )
    # The test client's own httpx log is not the service's; uvicorn's access log is off (serve).
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert "MRN-SECRET-123" not in text
    assert "38.6" not in text and "38.5" not in text


@pytest.mark.asyncio
async def test_lenient_evaluate_names_left_out_input_in_a_warning_outcome(client: httpx.AsyncClient) -> None:
    body = f.body(f.patient(), f.temperature(38.5, T0), f.temperature(38.5, "2026-01-06T10:00:00"))
    r = await client.post("/fhir/$evaluate", content=body, headers=FHIR_JSON)
    assert r.status_code == 200, r.text
    oo = [e["resource"] for e in r.json()["entry"] if e["resource"]["resourceType"] == "OperationOutcome"]
    assert oo[0]["issue"][0]["severity"] == "warning"
    assert oo[0]["issue"][0]["expression"] == ["Bundle.entry[2].resource.effectiveDateTime"]
    strict = await client.post("/fhir/$evaluate", content=body, headers={**FHIR_JSON, "Prefer": "handling=strict"})
    assert strict.status_code == 422
    assert strict.json()["issue"][0]["expression"] == ["Bundle.entry[2].resource.effectiveDateTime"]
