"""No 500 from input (issue 11): every malformed request found by hand answers a 4xx
OperationOutcome naming the problem and its path, and nothing stored changes."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests import factories as f
from tests.api_helpers import transaction

pytestmark = pytest.mark.asyncio

T0 = "2026-01-06T10:00:00+00:00"


def bundle(*resources: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**f.bundle(*resources), **extra}


def with_subject(subject: Any) -> dict[str, Any]:
    return {**f.temperature(39.0, T0, id="t1"), "subject": subject}


EVALUATE_CASES = [
    pytest.param(
        bundle(f.patient(), with_subject("Patient/p1")), "Bundle.entry[1].resource.subject", id="subject-string"
    ),
    pytest.param(
        bundle(f.patient(), with_subject([{"reference": "Patient/p1"}])),
        "Bundle.entry[1].resource.subject",
        id="subject-list",
    ),
    pytest.param(bundle(f.patient(), type=["collection"]), "Bundle.type", id="bundle-type-array"),
    pytest.param(bundle(f.patient(), entry={"resource": f.patient()}), "Bundle.entry", id="entry-object"),
    pytest.param(bundle(f.patient(), f.temperature(39.0, "0001-01-01T00:00:00+00:00")), None, id="year-0001"),
    pytest.param(bundle(f.patient(), f.temperature(39.0, "9999-12-31T23:59:59+00:00")), None, id="year-9999"),
    pytest.param(bundle(f.patient(birth_date="0001-01-01"), f.temperature(39.0, T0)), None, id="birth-year-0001"),
    pytest.param(
        bundle(f.patient(), {**f.temperature(39.0, T0), "meta": {"versionId": "²"}}), None, id="version-superscript"
    ),
    pytest.param(bundle(f.patient(), {**f.temperature(39.0, T0), "meta": "x"}), None, id="meta-string"),
    pytest.param(bundle(f.patient(), {**f.temperature(39.0, T0), "code": "x"}), None, id="code-string"),
    pytest.param(bundle(f.patient(), {**f.temperature(39.0, T0), "valueQuantity": [1]}), None, id="quantity-list"),
    pytest.param(
        bundle(f.patient(), {**f.temperature(39.0, T0), "effectivePeriod": "x", "effectiveDateTime": None}),
        None,
        id="period-string",
    ),
    pytest.param(
        bundle(f.patient(), {**f.administration("norepinephrine", start=T0), "dosage": {"rateQuantity": "5"}}),
        None,
        id="rate-string",
    ),
    pytest.param(
        bundle(f.patient(), {**f.administration("norepinephrine", start=T0), "medicationReference": "Medication/m"}),
        None,
        id="medication-reference-string",
    ),
]


@pytest.mark.parametrize(("doc", "path"), EVALUATE_CASES)
@pytest.mark.parametrize("prefer", [None, "handling=strict"])
async def test_malformed_evaluate_is_never_a_500(
    client: httpx.AsyncClient, doc: dict[str, Any], path: str | None, prefer: str | None
) -> None:
    headers = {"Prefer": prefer} if prefer else {}
    r = await client.post("/fhir/$evaluate", content=orjson.dumps(doc), headers=headers)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        body = r.json()
        assert body["resourceType"] == "OperationOutcome"
        if path is not None:
            assert any(path in e for i in body["issue"] for e in i.get("expression", ())), body


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2026-01-06T10:00:00+14:00"])
async def test_evaluation_time_at_the_ends_of_the_calendar_is_a_400(client: httpx.AsyncClient, at: str) -> None:
    doc = bundle(f.patient(), f.temperature(39.0, T0))
    r = await client.post("/fhir/$evaluate", params={"at": at}, content=orjson.dumps(doc))
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["issue"][0]["expression"] == ["at"]


STORE_CASES = [
    pytest.param(with_subject("Patient/p1"), id="subject-string"),
    pytest.param(with_subject(["Patient/p1"]), id="subject-list"),
    pytest.param({**f.temperature(39.0, T0, id="t1"), "component": [5]}, id="component-not-object"),
    pytest.param({**f.temperature(39.0, "0001-01-01T00:00:00+00:00", id="t1")}, id="year-0001"),
    pytest.param({**f.temperature(39.0, T0, id="t1"), "meta": {"versionId": "²"}}, id="version-superscript"),
    pytest.param({**f.temperature(39.0, T0, id="t1"), "meta": {"versionId": "9" * 5000}}, id="version-5000-digits"),
]


@pytest.mark.parametrize("res", STORE_CASES)
async def test_malformed_store_is_never_a_500_and_changes_nothing(
    client: httpx.AsyncClient, res: dict[str, Any]
) -> None:
    stored = f.temperature(38.0, T0, id="t1", meta={"versionId": "1"})
    assert (await client.post("/fhir", content=orjson.dumps(transaction([f.patient(), stored])))).status_code == 200
    for body, method, url in (
        (transaction([res]), "POST", "/fhir"),
        (res, "PUT", "/fhir/Observation/t1"),
    ):
        r = await client.request(method, url, content=orjson.dumps(body))
        assert r.status_code < 500, r.text
    after = (await client.get("/fhir/Observation/t1")).json()
    if after.get("valueQuantity", {}).get("value") == 38.0:
        assert after["meta"]["versionId"] == "1"


@pytest.mark.parametrize("offset", [2**63, 2**64, -1])
async def test_search_offset_out_of_range_is_a_400(client: httpx.AsyncClient, offset: int) -> None:
    r = await client.get("/fhir/RiskAssessment", params={"_offset": offset})
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["query._offset"]
