"""The independent FHIR validators have teeth and accept good data."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

try:
    from tests.fhir_validators import assert_valid_fhir, assert_valid_r4b, format_npm_errors, validate_with_npm
except ImportError:  # pragma: no cover - depends on pytest rootdir/import mode
    from fhir_validators import (  # type: ignore[no-redef]
        assert_valid_fhir,
        assert_valid_r4b,
        format_npm_errors,
        validate_with_npm,
    )

pytestmark = pytest.mark.integration  # the npm validators (node)

fhir_validators_module = sys.modules[validate_with_npm.__module__]

RA_FULL_URL = "urn:uuid:6f1c2b7e-8d7a-4c53-9a0e-2b1f4c3d5e01"
PROV_FULL_URL = "urn:uuid:0b9e5c1a-3f2d-4e6b-8a7c-9d0e1f2a3b02"


def risk_assessment() -> dict:
    return {
        "resourceType": "RiskAssessment",
        "id": "ra1",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "occurrenceDateTime": "2024-05-01T10:00:00+00:00",
        "prediction": [
            {
                "outcome": {
                    "coding": [
                        {
                            "system": "http://snomed.info/sct",
                            "code": "442437005",
                            "display": "Cytokine release syndrome",
                        }
                    ],
                    "text": "CRS",
                },
                "qualitativeRisk": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/risk-probability",
                            "code": "high",
                            "display": "High likelihood",
                        }
                    ]
                },
                "rationale": "ASTCT 2019: fever with hypotension requiring one vasopressor (grade 2 CRS)",
            }
        ],
    }


def provenance() -> dict:
    return {
        "resourceType": "Provenance",
        "id": "prov1",
        "target": [{"reference": "RiskAssessment/ra1"}],
        "recorded": "2024-05-01T10:00:05.123+02:00",
        "agent": [{"who": {"display": "iectox grading service"}}],
    }


def collection_bundle() -> dict:
    prov = provenance()
    prov["target"] = [{"reference": RA_FULL_URL}]
    return {
        "resourceType": "Bundle",
        "id": "b1",
        "type": "collection",
        "entry": [
            {"fullUrl": RA_FULL_URL, "resource": risk_assessment()},
            {"fullUrl": PROV_FULL_URL, "resource": prov},
        ],
    }


def _single(resource: dict) -> dict:
    [result] = validate_with_npm([resource])
    return result


def test_valid_risk_assessment_passes_all_validators() -> None:
    ra = risk_assessment()
    assert_valid_fhir([ra])
    assert_valid_r4b([ra])


def test_bogus_status_flagged_by_fhirjs_required_binding() -> None:
    ra = risk_assessment()
    ra["status"] = "bogus"
    result = _single(ra)
    assert any(i["location"] == "RiskAssessment.status" and "bogus" in i["message"] for i in result["fhirjs"]), result
    report = "\n".join(format_npm_errors([result]))
    assert "RiskAssessment/ra1" in report and "fhir.js [error] RiskAssessment.status" in report, report


def test_missing_subject_flagged_by_medplum() -> None:
    ra = risk_assessment()
    del ra["subject"]
    result = _single(ra)
    assert any(i["expression"] == "RiskAssessment.subject" for i in result["medplum"]), result
    assert "medplum [error] RiskAssessment.subject" in "\n".join(format_npm_errors([result]))
    with pytest.raises(AssertionError, match="subject"):
        assert_valid_r4b([ra])


def test_provenance_instant_without_timezone_flagged_by_medplum() -> None:
    prov = provenance()
    prov["recorded"] = "2024-05-01T10:00:05"
    with pytest.raises(AssertionError, match=r"Provenance/prov1[\s\S]*medplum \[error\] Provenance\.recorded"):
        assert_valid_fhir([prov])


def test_valid_provenance_passes_all_validators() -> None:
    prov = provenance()
    assert_valid_fhir([prov])
    assert_valid_r4b([prov])


def test_valid_collection_bundle_passes_and_entries_are_validated_separately() -> None:
    bundle = collection_bundle()
    results = validate_with_npm([bundle])
    assert [(r["resourceType"], r["bundle_entry"]) for r in results] == [
        ("Bundle", None),
        ("RiskAssessment", 0),
        ("Provenance", 1),
    ]
    assert format_npm_errors(results) == []
    assert_valid_r4b([bundle])


def test_invalid_bundle_entry_is_reported_per_entry() -> None:
    bundle = collection_bundle()
    bad = copy.deepcopy(bundle)
    bad["entry"][0]["resource"]["status"] = "bogus"
    results = validate_with_npm([bad])
    by_entry = {r["bundle_entry"]: r for r in results}
    assert by_entry[0]["fhirjs"], by_entry[0]
    assert not by_entry[1]["fhirjs"] and not by_entry[1]["medplum"], by_entry[1]


def test_missing_node_modules_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fhir_validators_module, "NODE_DIR", tmp_path)
    with pytest.raises(RuntimeError, match=r"npm ci --prefix tests/node"):
        validate_with_npm([provenance()])
