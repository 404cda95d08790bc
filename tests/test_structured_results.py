"""GradeResult carries the verdict, the floor and the CRS facts as fields (issue 9)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.core.astct import GradingConfig, grade_crs
from service.core.model import Administration, PatientData, Sample

AT = datetime(2026, 1, 6, 12, tzinfo=UTC)


def _temp(value: float, hours_before: float, ref: str) -> Sample:
    return Sample("body-temperature", AT - timedelta(hours=hours_before), ref, value, "Cel", shown=f"{value} Cel")


def _data(*, samples: list[Sample], given: list[Administration] | None = None) -> PatientData:
    data = PatientData("Patient/p1")
    for s in samples:
        data.samples.setdefault(s.concept, []).append(s)
    for a in given or []:
        data.administrations.setdefault(a.concept, []).append(a)
    return data


def test_verdict_and_floor_are_fields() -> None:
    pressor = Administration("norepinephrine", AT - timedelta(hours=2), None, "MedicationAdministration/ne")
    r = grade_crs(_data(samples=[_temp(39.0, 1, "Observation/t")], given=[pressor]), AT, GradingConfig())
    assert r.grade is None and r.floor == 3  # no oxygen record: at least grade 3 from the pressor
    assert r.rationale.startswith(r.verdict + " Window ")
    assert r.crs is not None and r.crs.fever_present and not r.fever_masked
    assert r.crs.vasopressors_concurrent == 1 and r.crs.vasopressor_agents == ("norepinephrine",)
    assert [d.name for d in r.domains] == ["fever", "hypotension", "hypoxia"]
    assert [d.grade for d in r.domains] == [1, 3, None]


def test_masked_fever_is_a_flag() -> None:
    toci = Administration(
        "tocilizumab", AT - timedelta(hours=30), AT - timedelta(hours=30), "MedicationAdministration/t"
    )
    day0 = Administration("cart-infusion", AT - timedelta(days=3), AT - timedelta(days=3), "MedicationAdministration/c")
    samples = [_temp(39.0, 40, "Observation/f"), _temp(37.0, 1, "Observation/n")]
    r = grade_crs(_data(samples=samples, given=[toci, day0]), AT, GradingConfig())
    assert r.fever_masked and r.crs is not None and r.crs.fever_present is False
    assert r.crs.fever_refs == ("Observation/f", "MedicationAdministration/t")


def test_no_fever_has_no_floor() -> None:
    r = grade_crs(_data(samples=[_temp(37.0, 1, "Observation/n")]), AT, GradingConfig())
    assert r.grade == 0 and r.floor is None and not r.fever_masked
    assert r.verdict.startswith("Grade 0: no fever")
