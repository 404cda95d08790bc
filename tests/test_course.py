"""The course of a patient: onset, peak, resolution, duration and daily maxima, exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest

from service.app.evaluate import Grader, courses
from service.core.astct import GradingConfig, grade_crs
from service.core.course import CourseConfig, course_of
from service.core.model import Administration, PatientData, Sample
from tests import factories as f
from tests.fhir_validators import assert_valid_fhir, assert_valid_r4b

DAY0 = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)


def h(hours: float) -> datetime:
    return DAY0 + timedelta(hours=hours)


def trajectory(last_fever_h: int = 143) -> PatientData:
    """Afebrile to 47 h; fever 38.6 °C hourly from 48 h to `last_fever_h`; norepinephrine 96-102 h
    (day 4: CRS grade 3); normal pressure and room air throughout; no masking drug."""
    temps, bps, o2 = [], [], []
    for hour in range(0, 14 * 24):
        t = h(hour)
        value = 38.6 if 48 <= hour <= last_fever_h else 36.9
        temps.append(Sample("body-temperature", t, f"Observation/t{hour}", value=value, unit="Cel", shown=f"{value}"))
        bps.append(Sample("systolic-bp", t, f"Observation/bp{hour}", value=118.0, unit="mm[Hg]", shown="118"))
        o2.append(Sample("oxygen-device", t, f"Observation/o2{hour}", code="none", shown="none"))
    day0 = Administration("cart-infusion", DAY0, DAY0, "MedicationAdministration/cart")
    ne = Administration("norepinephrine", h(96), h(102), "MedicationAdministration/ne", rate=8.0)
    return PatientData(
        "Patient/p1",
        samples={"body-temperature": temps, "systolic-bp": bps, "oxygen-device": o2},
        administrations={"cart-infusion": [day0], "norepinephrine": [ne]},
    )


def test_peak_grade_3_on_day_4_resolving_on_day_7() -> None:
    data, cfg = trajectory(), GradingConfig()
    at = h(10 * 24)
    c = course_of("astct-crs", "ASTCT", lambda t: grade_crs(data, t, cfg).grade, DAY0, at, CourseConfig())
    assert c.onset == h(48)  # the first fever enters the window
    assert (c.peak_grade, c.peak_time) == (3, h(96))  # the vasopressor starts on day 4
    # The last fever (143 h) leaves the 24 h window at 168 h = day 7, and grade 0 then holds 24 h.
    assert c.resolution == h(168)
    assert c.duration == timedelta(hours=120)
    assert dict(c.daily_max) == {0: 0, 1: 0, 2: 1, 3: 1, 4: 3, 5: 3, 6: 1, 7: 0, 8: 0, 9: 0, 10: 0}
    assert c.indeterminate_samples == 0
    text = c.rationale(CourseConfig())
    assert "Onset 2026-03-03T00:00+00:00" in text and "peak grade 3" in text and "duration 120 h" in text


def test_not_resolved_until_grade_0_holds_the_resolution_period() -> None:
    data, cfg = trajectory(), GradingConfig()
    at = h(168 + 23)  # grade 0 since 168 h, for 23 h only
    c = course_of("astct-crs", "ASTCT", lambda t: grade_crs(data, t, cfg).grade, DAY0, at, CourseConfig())
    assert c.resolution is None and c.duration is None
    assert "not resolved" in c.rationale(CourseConfig())
    shorter = CourseConfig(resolution_period=timedelta(hours=12))
    c12 = course_of("astct-crs", "ASTCT", lambda t: grade_crs(data, t, cfg).grade, DAY0, at, shorter)
    assert c12.resolution == h(168)


def test_indeterminate_samples_break_resolution_and_never_count_as_zero() -> None:
    grades = {h(x): g for x, g in [(0, 0), (1, 2), (2, None), (3, 0), (4, 0), (5, 0)]}
    c = course_of(
        "m", "scale", lambda t: grades.get(t, 0), DAY0, h(5), CourseConfig(resolution_period=timedelta(hours=2))
    )
    assert (c.onset, c.peak_grade, c.resolution) == (h(1), 2, h(3))
    only_unknown = course_of("m", "scale", lambda t: None, DAY0, h(3), CourseConfig())
    assert only_unknown.peak_grade is None and dict(only_unknown.daily_max) == {0: None}
    assert "Indeterminate" in only_unknown.rationale(CourseConfig())


def test_every_scale_has_a_course() -> None:
    out = courses(Grader(trajectory(), GradingConfig()), h(10 * 24), CourseConfig())
    assert [c.method for c, _ in out] == [
        "astct-crs",
        "astct-icans",
        "lee2014-crs",
        "penn-crs",
        "mskcc-crs",
        "cartox-crs",
        "ctcae4-crs",
        "ctcae5-crs",
        "cartox-cres",
    ]
    _, peak = out[0]
    assert peak is not None and peak.grade == 3 and "MedicationAdministration/ne" in peak.basis


# --- through FHIR: max-grade RiskAssessments, $course, compare ----------------------------


def fhir_trajectory() -> list[dict]:  # type: ignore[type-arg]
    res: list[dict] = [  # type: ignore[type-arg]
        f.patient(),
        f.administration(f.local("cart-infusion"), at=DAY0.isoformat(), status="completed", id="cart"),
        f.administration("norepinephrine", start=h(96).isoformat(), end=h(102).isoformat(), id="ne"),
    ]
    for hour in range(0, 8 * 24, 4):
        value = 38.6 if 48 <= hour <= 140 else 36.9
        res += [
            f.temperature(value, h(hour).isoformat(), id=f"t{hour}"),
            f.bp_panel(118, 85, h(hour).isoformat(), id=f"bp{hour}"),
            f.oxygen_device("none", h(hour).isoformat(), id=f"o2{hour}"),
            f.ice_score(10, h(hour).isoformat(), id=f"ice{hour}"),
        ]
    return res


def transaction(resources: list[dict]) -> bytes:  # type: ignore[type-arg]
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                for r in resources
            ],
        }
    )


@pytest.mark.asyncio
async def test_max_grade_assessment_and_course_endpoint(client: httpx.AsyncClient) -> None:
    at = h(200).isoformat()  # the last fever (140 h) left the window at 165 h; grade 0 held 24 h by 189 h
    doc = (await client.post("/fhir/$evaluate", content=f.body(*fhir_trajectory()), params={"at": at})).json()
    max_ras = [
        e["resource"]
        for e in doc["entry"]
        if e["resource"]["resourceType"] == "RiskAssessment"
        and e["resource"]["code"]["coding"][0]["code"] == "max-grade"
    ]
    crs = next(r for r in max_ras if r["method"]["coding"][0]["code"] == "astct-crs")
    assert crs["prediction"][0]["outcome"]["coding"][0]["code"] == "grade-3"
    assert crs["occurrencePeriod"] == {"start": DAY0.isoformat(), "end": at}
    assert "MedicationAdministration/ne" in {b["reference"] for b in crs["basis"]}
    rationale = crs["prediction"][0]["rationale"]
    assert "Onset" in rationale and "peak grade 3" in rationale and "duration" in rationale
    assert_valid_fhir([doc])

    await client.post("/fhir", content=transaction(fhir_trajectory()))
    r = await client.get("/fhir/Patient/p1/$course", params={"at": at})
    assert r.status_code == 200
    params = r.json()
    assert params["resourceType"] == "Parameters"
    by_method = {
        next(p["valueCoding"]["code"] for p in c["part"] if p["name"] == "method"): {p["name"]: p for p in c["part"]}
        for c in params["parameter"]
    }
    crs_course = by_method["astct-crs"]
    assert crs_course["max-grade"]["valueCoding"]["code"] == "grade-3"
    assert crs_course["onset"]["valueDateTime"] == h(48).isoformat()
    assert crs_course["peak-time"]["valueDateTime"] == h(96).isoformat()
    assert by_method["astct-icans"]["max-grade"]["valueCoding"]["code"] == "grade-0"
    assert_valid_r4b([params])
    assert_valid_fhir([params])
    missing = await client.get("/fhir/Patient/nobody/$course")
    assert missing.status_code == 404


@pytest.mark.integration  # runs the CLI
def test_compare_cli_prints_every_scale(tmp_path: Path) -> None:
    bundle = tmp_path / "b.json"
    bundle.write_bytes(f.body(*fhir_trajectory()))
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "compare", str(bundle), "--at", h(150).isoformat()],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith("astct")}
    assert rows["astct-crs"][1:3] == ["1", "3"]  # current grade 1 (fever at 140 h in window), max 3
    assert rows["astct-crs"][3] == h(48).isoformat()
    assert json.dumps(rows)  # printable
