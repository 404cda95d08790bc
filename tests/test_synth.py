"""The synthetic cohort generator: deterministic, valid FHIR R4, accepted units, known grades."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.codebook import load_codebook
from service.core.astct import FEVER_C, GradingConfig, grade_crs, grade_icans
from service.core.units import converter, units_for
from service.devtools.synth import (
    DEFAULT_BASE,
    DEFAULT_START,
    SCENARIOS,
    SyntheticPatient,
    generate_cohort,
    generate_patient,
    write_cohort,
)

BASE = DEFAULT_BASE
LOCAL = f"{BASE}/CodeSystem/local"
CB = load_codebook(BASE)
SEED = 2026
EXPECTED = {
    "no-crs": (0, 0),
    "crs-1": (1, 0),
    "crs-2": (2, 0),
    "crs-3": (3, 0),
    "crs-4": (4, 0),
    "masked-tocilizumab": (3, 0),
    "icans-adult": (None, 3),  # CRS 1 or 2, drawn per patient
    "child-capd": (2, 3),
}
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
DATETIME_KEYS = ("effectiveDateTime", "start", "end", "lastUpdated", "issued")


def rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - synthetic test data


def quick(i: int, scenario: str) -> SyntheticPatient:
    """A cheap patient: 7 days, vitals q4h."""
    return generate_patient(rng(i), i, scenario, days=7, base=BASE, start=DEFAULT_START, vitals_every_min=240)


@pytest.fixture(scope="module")
def cohort() -> list[SyntheticPatient]:
    return generate_cohort(len(SCENARIOS), SEED)


@pytest.fixture(scope="module")
def small_cohort() -> list[SyntheticPatient]:
    """Every scenario, 7 days, vitals q4h: small enough to validate every resource with pydantic."""
    return [quick(i, s) for i, s in enumerate(SCENARIOS)]


def resources(p: SyntheticPatient, rtype: str | None = None) -> Iterator[dict[str, Any]]:
    for e in p.bundle["entry"]:
        if rtype is None or e["resource"]["resourceType"] == rtype:
            yield e["resource"]


def codings(cc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for c in cc.get("coding", [])]


def observations_of(p: SyntheticPatient, concept: str) -> list[dict[str, Any]]:
    return [r for r in resources(p, "Observation") if CB.concept_for(codings(r["code"]), None) == concept]


def when(r: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(r["effectiveDateTime"])


def days_after_day0(p: SyntheticPatient, iso: str) -> float:
    return (datetime.fromisoformat(iso) - p.day0).total_seconds() / 86400


# --- determinism and coverage ------------------------------------------------------------


def test_same_seed_same_output_and_different_seed_differs(cohort: list[SyntheticPatient]) -> None:
    again = generate_cohort(len(SCENARIOS), SEED)
    assert [orjson.dumps(p.bundle) for p in again] == [orjson.dumps(p.bundle) for p in cohort]
    assert [(p.patient_id, p.day0, p.peak_time) for p in again] == [(p.patient_id, p.day0, p.peak_time) for p in cohort]
    other = generate_cohort(len(SCENARIOS), SEED + 1)
    assert [p.patient_id for p in other] != [p.patient_id for p in cohort]
    assert all(orjson.dumps(a.bundle) != orjson.dumps(b.bundle) for a, b in zip(other, cohort, strict=True))


def test_patient_does_not_depend_on_cohort_size(cohort: list[SyntheticPatient]) -> None:
    assert [p.bundle for p in generate_cohort(2, SEED)] == [p.bundle for p in cohort[:2]]


def test_every_scenario_present_with_expected_grades(cohort: list[SyntheticPatient]) -> None:
    assert [p.scenario for p in cohort] == list(SCENARIOS)
    assert set(EXPECTED) == set(SCENARIOS)
    for p in cohort:
        crs, icans = EXPECTED[p.scenario]
        assert p.expected_peak_icans == icans
        if crs is None:
            assert p.expected_peak_crs in (1, 2)
        else:
            assert p.expected_peak_crs == crs
        assert p.day0 < p.peak_time < p.day0 + timedelta(days=6)
    again = generate_cohort(len(SCENARIOS) + 3, SEED, days=7)
    assert [p.scenario for p in again] == [SCENARIOS[i % len(SCENARIOS)] for i in range(len(again))]


def test_bad_arguments_are_rejected() -> None:
    r = rng(1)
    with pytest.raises(ValueError, match="scenario"):
        generate_patient(r, 0, "crs-9", days=10, base=BASE, start=DEFAULT_START)
    with pytest.raises(ValueError, match="days"):
        generate_patient(r, 0, "crs-1", days=3, base=BASE, start=DEFAULT_START)
    with pytest.raises(ValueError, match="timezone"):
        generate_patient(r, 0, "crs-1", days=10, base=BASE, start=datetime(2026, 1, 5, 8))


# --- FHIR shape and validity ---------------------------------------------------------------


def test_bundle_shape(cohort: list[SyntheticPatient]) -> None:
    seen_ids: set[str] = set()
    seen_urls: set[str] = set()
    for p in cohort:
        b = p.bundle
        assert b["resourceType"] == "Bundle" and b["type"] == "transaction"
        first = b["entry"][0]["resource"]
        assert first["resourceType"] == "Patient" and first["id"] == p.patient_id
        for e in b["entry"]:
            r = e["resource"]
            key = f"{r['resourceType']}/{r['id']}"
            assert FHIR_ID.match(r["id"]), r["id"]
            assert e["request"] == {"method": "PUT", "url": key}
            assert e["fullUrl"].startswith("urn:uuid:") and len(e["fullUrl"]) == len("urn:uuid:") + 36
            assert key not in seen_ids and e["fullUrl"] not in seen_urls
            seen_ids.add(key)
            seen_urls.add(e["fullUrl"])
            assert r["meta"]["versionId"] == "1"
            if r["resourceType"] != "Patient":
                assert r["subject"] == {"reference": f"Patient/{p.patient_id}"}
                if r["resourceType"] == "Condition":
                    assert r["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/icd-10-cm"
                else:
                    assert r["status"] in ("final", "completed")


def test_every_resource_validates_as_r4b(small_cohort: list[SyntheticPatient]) -> None:
    from fhir.resources.R4B.bundle import Bundle

    for p in small_cohort:
        Bundle.model_validate(p.bundle)


from tests.fhir_validators import assert_valid_fhir  # noqa: E402


@pytest.mark.integration  # npm validators (node)
def test_npm_validators_accept_a_bundle(small_cohort: list[SyntheticPatient]) -> None:
    """Medplum + FHIR.js (required bindings); fails, never skips, without tests/node installed."""
    p = next(p for p in small_cohort if p.scenario == "crs-4")
    assert_valid_fhir([e["resource"] for e in p.bundle["entry"]])


def _datetimes(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in DATETIME_KEYS and isinstance(v, str):
                yield v
            else:
                yield from _datetimes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _datetimes(v)


def test_all_datetimes_have_timezones(cohort: list[SyntheticPatient]) -> None:
    n = 0
    offsets = set()
    for p in cohort:
        assert p.day0.tzinfo is not None and p.peak_time.tzinfo is not None
        for s in _datetimes(p.bundle):
            t = datetime.fromisoformat(s)
            assert t.tzinfo is not None, s
            assert re.search(r"[+-]\d{2}:\d{2}$", s), s
            offsets.add(s[-6:])
            n += 1
    assert n > 1000
    assert "+00:00" in offsets


def test_quantities_use_accepted_ucum_units(cohort: list[SyntheticPatient]) -> None:
    used: dict[str, set[str]] = {}

    def check(concept: str | None, q: dict[str, Any]) -> None:
        assert q["system"] == "http://unitsofmeasure.org"
        if concept is None or not units_for(concept):
            return  # not a graded quantity (heart rate, diastolic, drug doses ...)
        converter(concept, q["code"])  # raises UnitError for a unit the service rejects
        used.setdefault(concept, set()).add(q["code"])

    for p in cohort:
        for r in resources(p):
            if r["resourceType"] == "Observation":
                concept = CB.concept_for(codings(r["code"]), None)
                if "valueQuantity" in r:
                    check(concept, r["valueQuantity"])
                for c in r.get("component", []):
                    check(CB.concept_for(codings(c["code"]), None), c["valueQuantity"])
                if "valueCodeableConcept" in r:
                    assert concept is not None
                    assert CB.value_for(concept, codings(r["valueCodeableConcept"])) is not None
                if "valueInteger" in r:
                    assert concept in ("ice-score", "capd-score")
            elif r["resourceType"] == "MedicationAdministration":
                med = r["medicationCodeableConcept"]
                concept = CB.concept_for(codings(med), med.get("text"))
                dosage = r.get("dosage", {})
                if "rateQuantity" in dosage:
                    assert CB.concepts[concept or ""].kind == "vasopressor"
                    check(concept, dosage["rateQuantity"])
                if "dose" in dosage:
                    check(concept, dosage["dose"])
    graded = {
        "body-temperature",
        "systolic-bp",
        "mean-arterial-pressure",
        "spo2",
        "oxygen-flow",
        "body-weight",
        "crp",
        "ferritin",
        "ldh",
        "platelets",
        "creatinine",
        "anc",
        "hemoglobin",
        "ast",
        "alt",
        "norepinephrine",
    }
    assert graded <= set(used), graded - set(used)


def test_units_are_mixed_across_sites() -> None:
    units: set[str] = set()
    for p in (quick(i, SCENARIOS[i % len(SCENARIOS)]) for i in range(24)):
        for r in resources(p, "Observation"):
            if "valueQuantity" in r:
                units.add(r["valueQuantity"]["code"])
    assert {"Cel", "[degF]", "mg/dL", "mg/L", "umol/L", "10*9/L", "10*3/uL", "g/L", "g/dL"} <= units


# --- clinical content ------------------------------------------------------------------


def test_vitals_interval_between_15_min_and_4_h(cohort: list[SyntheticPatient]) -> None:
    for p in cohort:
        temps = sorted(when(r) for r in observations_of(p, "body-temperature"))
        gaps = {int((b - a).total_seconds() // 60) for a, b in itertools.pairwise(temps)}
        assert min(gaps) >= 15 and max(gaps) <= 240, (p.scenario, sorted(gaps))
        assert temps[0] <= p.day0 - timedelta(hours=23) and temps[-1] >= p.day0 + timedelta(days=9)
        if p.scenario != "no-crs":
            assert min(gaps) <= 60, p.scenario  # denser while sick
        # a vitals set: temperature, BP panel, SpO2 and the oxygen device at the same time
        devices = {when(r) for r in observations_of(p, "oxygen-device")}
        assert set(temps) <= devices
        assert set(temps) <= {when(r) for r in observations_of(p, "spo2")}


def test_benchmark_density_gives_about_ten_thousand_resources() -> None:
    p = generate_patient(rng(7), 4, "crs-4", days=14, base=BASE, start=DEFAULT_START, vitals_every_min=15)
    n = len(p.bundle["entry"])
    print(f"\ncrs-4, 14 days, vitals q15min: {n} resources")
    assert 8_000 <= n <= 12_000
    temps = sorted(when(r) for r in observations_of(p, "body-temperature"))
    assert {b - a for a, b in itertools.pairwise(temps)} == {timedelta(minutes=15)}


def test_patients_day0_and_treatments(cohort: list[SyntheticPatient]) -> None:
    for p in cohort:
        patient = next(resources(p, "Patient"))
        age = (p.day0.date() - datetime.fromisoformat(patient["birthDate"]).date()).days / 365.25
        if p.scenario == "child-capd":
            assert 4 <= age < 12
        else:
            assert 25 <= age < 76
        assert patient["gender"] in ("female", "male")
        meds = list(resources(p, "MedicationAdministration"))
        cart = [m for m in meds if (LOCAL, "cart-infusion") in codings(m["medicationCodeableConcept"])]
        assert len(cart) == 1
        assert datetime.fromisoformat(cart[0]["effectivePeriod"]["start"]) == p.day0
        if p.scenario == "child-capd":
            assert cart[0]["medicationCodeableConcept"]["text"] == "tisagenlecleucel"
        ld = [m for m in meds if CB.concept_for(codings(m["medicationCodeableConcept"]), None) == "lymphodepletion"]
        ld_days = sorted({round(days_after_day0(p, m["effectivePeriod"]["start"])) for m in ld})
        assert len(ld) == 6 and ld_days == [-5, -4, -3], ld_days
        weights = observations_of(p, "body-weight")
        assert len(weights) == 1 and weights[0]["valueQuantity"]["code"] == "kg"
        # ICE (adults) or CAPD (children) with a level of consciousness every 8-12 h
        tool = "capd-score" if p.scenario == "child-capd" else "ice-score"
        scores = sorted(when(r) for r in observations_of(p, tool))
        assert observations_of(p, "ice-score" if tool == "capd-score" else "capd-score") == []
        assert scores and set(scores) <= {when(r) for r in observations_of(p, "consciousness")}
        assert max(b - a for a, b in itertools.pairwise(scores)) <= timedelta(hours=12)


def _canonical(concept: str, r: dict[str, Any]) -> float:
    q = r["valueQuantity"]
    return converter(concept, q["code"])(float(q["value"]), None)


def test_labs_follow_the_course(cohort: list[SyntheticPatient]) -> None:
    for p in cohort:
        crp = sorted((when(r), _canonical("crp", r)) for r in observations_of(p, "crp"))
        assert crp[0][0] < p.day0 - timedelta(days=5)  # the pre-lymphodepletion set (day -6)
        assert len(crp) >= 16  # daily
        baseline = crp[0][1]
        peak = max(v for _, v in crp)
        if p.expected_peak_crs >= 2:
            assert peak > baseline + 3, (p.scenario, baseline, peak)
        plt = [_canonical("platelets", r) for r in observations_of(p, "platelets")]
        assert min(plt) < 0.8 * plt[0]
        anc = [_canonical("anc", r) for r in observations_of(p, "anc")]
        assert min(anc) < 0.5  # lymphodepletion


def test_scenario_features(cohort: list[SyntheticPatient]) -> None:
    by = {p.scenario: p for p in cohort}
    temps = {
        s: [_canonical("body-temperature", r) for r in observations_of(p, "body-temperature")] for s, p in by.items()
    }
    assert max(temps["no-crs"]) < FEVER_C
    for s in SCENARIOS[1:]:
        assert max(temps[s]) >= FEVER_C + 0.3, s
    child = by["child-capd"]
    assert max(r["valueInteger"] for r in observations_of(child, "capd-score")) >= 9
    ice = [r["valueInteger"] for r in observations_of(by["icans-adult"], "ice-score")]
    assert min(ice) == 2 and ice[-1] == 10
    loc = {
        CB.value_for("consciousness", codings(r["valueCodeableConcept"]))
        for r in observations_of(by["icans-adult"], "consciousness")
    }
    assert {"awakens-to-voice", "awakens-to-tactile"} <= loc
    for s in ("no-crs", "crs-1", "crs-2", "crs-3", "crs-4", "masked-tocilizumab"):
        assert {r["valueInteger"] for r in observations_of(by[s], "ice-score")} == {10}


# --- grades: the service's own ingest + ASTCT grading reproduce the expected peaks ---------


def _grade_series(p: SyntheticPatient) -> tuple[Any, list[int | None], list[int | None]]:
    from service.fhir.ingest import parse_patient_entries, split_entries

    entries = split_entries(p.bundle, max_entries=1_000_000, bundle_types=frozenset({"transaction"}))
    data = parse_patient_entries(entries, CB).data
    cfg = GradingConfig()
    crs: list[int | None] = []
    icans: list[int | None] = []
    t = p.day0
    while t <= p.day0 + timedelta(days=7):
        crs.append(grade_crs(data, t, cfg).grade)
        icans.append(grade_icans(data, t, cfg).grade)
        t += timedelta(hours=3)
    return data, crs, icans


def test_service_grades_match_expected_peaks(cohort: list[SyntheticPatient]) -> None:
    cfg = GradingConfig()
    for p in cohort:
        data, crs, icans = _grade_series(p)
        assert None not in crs and None not in icans, p.scenario
        assert max(g for g in crs if g is not None) == p.expected_peak_crs, (p.scenario, crs)
        assert max(g for g in icans if g is not None) == p.expected_peak_icans, (p.scenario, icans)
        at_crs = grade_crs(data, p.peak_time, cfg)
        at_icans = grade_icans(data, p.peak_time, cfg)
        assert at_crs.grade == p.expected_peak_crs, (p.scenario, at_crs.rationale)
        assert at_icans.grade == p.expected_peak_icans, (p.scenario, at_icans.rationale)
        if p.scenario == "masked-tocilizumab":
            window = [
                _canonical("body-temperature", r)
                for r in observations_of(p, "body-temperature")
                if p.peak_time - timedelta(hours=24) <= when(r) <= p.peak_time
            ]
            assert window and max(window) < FEVER_C  # the grade needs the masked-fever rule
            assert "masked" in at_crs.rationale


# --- output ----------------------------------------------------------------------------------


def test_write_cohort(tmp_path: Path, cohort: list[SyntheticPatient]) -> None:
    paths = write_cohort(cohort[:2], tmp_path / "out")
    assert [x.name for x in paths] == [f"{p.patient_id}.json" for p in cohort[:2]]
    for path, p in zip(paths, cohort, strict=False):
        assert json.loads(path.read_text()) == p.bundle
