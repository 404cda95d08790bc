"""Tiny FHIR R4 builders for tests: plain dicts, only the elements the adapter reads.

Every builder takes keyword overrides (`**extra`) merged last, so a test can break exactly
one element (drop `status`, change `subject`, ...). Codes come from the default codebook:
LOINC for vitals, RxNorm for drugs, the project-local CodeSystem for the rest.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import orjson

from service.devtools.synth import generate_patient

BASE = "https://iectox.org/fhir"  # Settings().canonical_base
LOCAL = f"{BASE}/CodeSystem/local"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
PATIENT_ID = "p1"
PATIENT_REF = f"Patient/{PATIENT_ID}"

# LOINC codes of the default codebook (fhir-integration.md "LOINC vitals").
TEMPERATURE = (LOINC, "8310-5")
SYSTOLIC = (LOINC, "8480-6")
MAP = (LOINC, "8478-0")
BP_PANEL = (LOINC, "85354-9")
O2_FLOW = (LOINC, "3151-8")
BODY_WEIGHT = (LOINC, "29463-7")
ICE = (LOCAL, "ice-score")
CAPD = (LOCAL, "capd-score")
RXCUI = {
    "norepinephrine": "7512",
    "epinephrine": "3992",
    "phenylephrine": "8163",
    "dopamine": "3628",
    "vasopressin": "11149",
    "tocilizumab": "612865",
    "dexamethasone": "3264",
}

_counter = {"n": 0}


def _next_id(prefix: str) -> str:
    _counter["n"] += 1
    return f"{prefix}{_counter['n']}"


def cc(system: str, code: str, text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": [{"system": system, "code": code}]}
    if text:
        out["text"] = text
    return out


def local(code: str) -> dict[str, Any]:
    return cc(LOCAL, code)


def patient(pid: str = PATIENT_ID, birth_date: str | None = "1970-01-01", **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "Patient", "id": pid}
    if birth_date is not None:
        res["birthDate"] = birth_date
    return {**res, **extra}


def observation(
    code: tuple[str, str],
    when: str,
    *,
    id: str | None = None,
    status: str = "final",
    subject: str = PATIENT_REF,
    **value: Any,
) -> dict[str, Any]:
    """An Observation; pass the value element as a keyword (valueQuantity=..., ...)."""
    return {
        "resourceType": "Observation",
        "id": id or _next_id("obs"),
        "status": status,
        "code": cc(*code),
        "subject": {"reference": subject},
        "effectiveDateTime": when,
        **value,
    }


def quantity(value: float, code: str | None, *, system: str | None = UCUM, unit: str | None = None) -> dict[str, Any]:
    q: dict[str, Any] = {"value": value}
    if unit is not None:
        q["unit"] = unit
    if system is not None:
        q["system"] = system
    if code is not None:
        q["code"] = code
    return q


def temperature(value: float, when: str, unit: str = "Cel", **extra: Any) -> dict[str, Any]:
    return observation(TEMPERATURE, when, valueQuantity=quantity(value, unit), **extra)


def systolic(value: float, when: str, **extra: Any) -> dict[str, Any]:
    return observation(SYSTOLIC, when, valueQuantity=quantity(value, "mm[Hg]"), **extra)


def bp_panel(sbp: float, mean: float, when: str, **extra: Any) -> dict[str, Any]:
    res = observation(BP_PANEL, when, **extra)
    res["component"] = [
        {"code": cc(*SYSTOLIC), "valueQuantity": quantity(sbp, "mm[Hg]")},
        {"code": cc(LOINC, "8462-4"), "valueQuantity": quantity(60, "mm[Hg]")},  # diastolic: not graded
        {"code": cc(*MAP), "valueQuantity": quantity(mean, "mm[Hg]")},
    ]
    return res


def oxygen_device(device: str, when: str, **extra: Any) -> dict[str, Any]:
    return observation((LOCAL, "oxygen-device"), when, valueCodeableConcept=local(f"oxygen-device.{device}"), **extra)


def ice_score(score: int, when: str, **extra: Any) -> dict[str, Any]:
    return observation(ICE, when, valueInteger=score, **extra)


def coded(concept: str, value: str, when: str, **extra: Any) -> dict[str, Any]:
    """A coded ICANS finding (consciousness, seizure, motor-weakness, cerebral-edema)."""
    return observation((LOCAL, concept), when, valueCodeableConcept=local(f"{concept}.{value}"), **extra)


def administration(
    drug: str | dict[str, Any],
    *,
    start: str | None = None,
    end: str | None = None,
    at: str | None = None,
    id: str | None = None,
    status: str = "in-progress",
    subject: str = PATIENT_REF,
    rate: tuple[float, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A MedicationAdministration of an RxNorm drug name (or a full medicationCodeableConcept).

    `at` gives effectiveDateTime; otherwise `start`/`end` give effectivePeriod (no end =
    ongoing).
    """
    med = cc(RXNORM, RXCUI[drug]) if isinstance(drug, str) else drug
    res: dict[str, Any] = {
        "resourceType": "MedicationAdministration",
        "id": id or _next_id("ma"),
        "status": status,
        "medicationCodeableConcept": med,
        "subject": {"reference": subject},
    }
    if at is not None:
        res["effectiveDateTime"] = at
    else:
        period: dict[str, str] = {}
        if start is not None:
            period["start"] = start
        if end is not None:
            period["end"] = end
        res["effectivePeriod"] = period
    if rate is not None:
        res["dosage"] = {"rateQuantity": quantity(rate[0], rate[1])}
    return {**res, **extra}


def procedure(code: dict[str, Any], when: str, *, status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": _next_id("proc"),
        "status": status,
        "code": code,
        "subject": {"reference": PATIENT_REF},
        "performedDateTime": when,
        **extra,
    }


def bundle(*resources: dict[str, Any], type: str = "collection") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": type,
        "entry": [
            {"fullUrl": f"urn:uuid:00000000-0000-0000-0000-{i:012d}", "resource": r} for i, r in enumerate(resources)
        ],
    }


def body(*resources: dict[str, Any]) -> bytes:
    """A collection Bundle of `resources`, as request bytes."""
    return orjson.dumps(bundle(*resources))


def _when(res: dict[str, Any]) -> datetime | None:
    for key in ("effectiveDateTime", "recordedDate", "performedDateTime"):
        if isinstance(res.get(key), str):
            return datetime.fromisoformat(res[key])
    for key in ("effectivePeriod", "performedPeriod"):
        if isinstance(res.get(key), dict) and "start" in res[key]:
            return datetime.fromisoformat(res[key]["start"])
    return None


def synthetic_at_peak(
    scenario: str = "crs-3", index: int = 0, seed: int = 1, base: str = BASE
) -> tuple[str, list[dict[str, Any]], int]:
    """A synthetic patient of `scenario` up to its peak (so the current grade is the peak grade),
    as plain resources (ids and meta kept). Returns (id, resources, expected peak CRS grade)."""
    rng = random.Random(seed)  # noqa: S311 (synthetic data, not crypto)
    sp = generate_patient(rng, index, scenario, days=7, base=base, start=datetime(2026, 1, 5, tzinfo=UTC))
    resources = [e["resource"] for e in sp.bundle["entry"]]
    cut = [r for r in resources if (t := _when(r)) is None or t <= sp.peak_time]
    assert any(r["resourceType"] == "Patient" for r in cut)
    return sp.patient_id, cut, sp.expected_peak_crs
