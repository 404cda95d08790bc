"""The CodeSystems and OperationDefinitions at their canonical URLs, and the CapabilityStatement's
security: every code iectox emits is defined, and all are valid FHIR for both validators."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import orjson
import pytest

from service.app.evaluate import evaluate_body
from service.codebook import load_codebook
from service.config.settings import Settings
from service.devtools.synth import generate_cohort
from service.fhir.terminology import code_systems, operation_definitions
from tests.fhir_validators import assert_valid_fhir


def test_every_emitted_code_is_defined() -> None:
    settings = Settings()
    base = settings.canonical_base
    codebook = load_codebook(base)
    defined = {
        f"{base}/CodeSystem/{cs_id}": {c["code"] for c in cs["concept"]}
        for cs_id, cs in code_systems(base, codebook).items()
    }
    seen: set[tuple[str, str]] = set()
    for p in generate_cohort(8, 5, days=7):
        body = orjson.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": e["resource"]} for e in p.bundle["entry"]],
            }
        )
        ev = evaluate_body(body, codebook, settings, None, datetime.now(UTC), strict=False)
        for ra in ev.assessments:
            codings = [*ra["method"]["coding"], *ra["code"]["coding"]]
            codings += [c for pred in ra["prediction"] for c in pred["outcome"]["coding"]]
            seen |= {(c["system"], c["code"]) for c in codings if c["system"].startswith(f"{base}/CodeSystem/")}
        for e in p.bundle["entry"]:
            text = orjson.dumps(e["resource"]).decode()
            if f"{base}/CodeSystem/local" in text:
                for concept in e["resource"].get("code", {}).get("coding", []):
                    if concept.get("system") == f"{base}/CodeSystem/local":
                        seen.add((concept["system"], concept["code"]))
    assert seen
    missing = sorted(c for c in seen if c[1] not in defined.get(c[0], set()))
    assert missing == []


def test_terminology_is_valid_fhir() -> None:
    base = Settings().canonical_base
    resources = [*code_systems(base, load_codebook(base)).values(), *operation_definitions(base).values()]
    assert_valid_fhir(resources)


@pytest.mark.asyncio
async def test_served_at_their_canonical_urls_and_announced(client: httpx.AsyncClient) -> None:
    anonymous = {"Authorization": ""}
    r = await client.get("/fhir/CodeSystem/outcome", headers=anonymous)
    assert r.status_code == 200 and r.json()["url"] == "https://iectox.org/fhir/CodeSystem/outcome"
    r = await client.get("/fhir/OperationDefinition/Patient-evaluate", headers=anonymous)
    assert r.status_code == 200 and r.json()["code"] == "evaluate"
    assert (await client.get("/fhir/CodeSystem/nope", headers=anonymous)).status_code == 404
    cap = (await client.get("/fhir/metadata", headers=anonymous)).json()
    security = cap["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR" and "cors" not in security
    for op in [*cap["rest"][0]["operation"], *(o for r in cap["rest"][0]["resource"] for o in r.get("operation", []))]:
        op_id = op["definition"].rsplit("/", 1)[1]
        assert (await client.get(f"/fhir/OperationDefinition/{op_id}", headers=anonymous)).status_code == 200, op_id
    assert_valid_fhir([cap])
