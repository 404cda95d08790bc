"""Lenient by default, strict on request (issue 10 items 3-6): unusable inputs are left out and
named with their FHIRPath; plausibility bounds; partial dates; site timezone; room-air setting."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from service.app.evaluate import Evaluation, evaluate_body
from service.codebook import load_codebook
from service.config.settings import Settings
from service.core.concepts import CONCEPTS, C
from service.fhir.errors import FhirError

try:
    from tests import factories as f
except ImportError:  # pragma: no cover - depends on pytest rootdir/import mode
    import factories as f  # type: ignore[no-redef]

SETTINGS = Settings()
CODEBOOK = load_codebook(SETTINGS.canonical_base)
AT = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)
NOW = "2026-01-06T10:00:00+00:00"


def evaluate(
    *resources: dict[str, Any], settings: Settings = SETTINGS, patient: dict[str, Any] | None = None
) -> Evaluation:
    return evaluate_body(f.body(patient or f.patient(), *resources), CODEBOOK, settings, AT, AT)


def crs(ev: Evaluation, method: str = "astct-crs") -> Any:
    return next(r for r in ev.results if r.method == method)


def outcome_issues(ev: Evaluation) -> list[dict[str, Any]]:
    bundle = ev.bundle()
    oos = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "OperationOutcome"]
    return oos[0]["issue"] if oos else []


NORMAL = (f.systolic(120, NOW), f.oxygen_device("none", NOW))


# --- plausibility bounds: below / on / above --------------------------------------------------

TEMPERATURE_CASES = [
    pytest.param(24.9, False, id="24.9-below"),
    pytest.param(25.0, True, id="25-on-low"),
    pytest.param(41.5, True, id="41.5-edge-graded"),
    pytest.param(45.0, True, id="45-on-high"),
    pytest.param(45.1, False, id="45.1-above"),
    pytest.param(1000.0, False, id="1000"),
    pytest.param(3.72, False, id="3.72"),
]


@pytest.mark.parametrize(("celsius", "graded"), TEMPERATURE_CASES)
def test_temperature_plausibility(celsius: float, graded: bool) -> None:
    ev = evaluate(f.temperature(celsius, NOW), *NORMAL)
    r = crs(ev)
    if graded:
        assert r.grade == (1 if celsius >= 38 else 0)
        assert not ev.left_out
    else:
        # Never a definite grade 0 (3.72) and never a fever (1000): left out, indeterminate, named.
        assert r.grade is None and "left out" in r.rationale.lower()
        assert "plausible range 25 to 45 Cel" in r.rationale
        assert outcome_issues(ev)[0]["expression"] == ["Bundle.entry[1].resource.valueQuantity.value"]


def test_implausible_temperature_beside_a_normal_one_is_indeterminate_not_0() -> None:
    r = crs(evaluate(f.temperature(3.72, NOW), f.temperature(37.0, NOW), *NORMAL))
    assert r.grade is None and r.floor is None
    assert "Observation/" in r.verdict and "left out" in r.verdict


def test_left_out_row_that_cannot_change_the_grade_leaves_it_standing() -> None:
    r = crs(evaluate(f.temperature(39.0, NOW), f.temperature(1000.0, NOW), *NORMAL))
    assert r.grade == 1
    assert "Left out (cannot change this grade)" in r.rationale


@pytest.mark.parametrize(
    ("systolic", "graded"),
    [
        pytest.param(-50.0, False, id="-50"),
        pytest.param(19.9, False, id="19.9-below"),
        pytest.param(20.0, True, id="20-on"),
        pytest.param(300.0, True, id="300-on"),
        pytest.param(300.1, False, id="300.1-above"),
    ],
)
def test_systolic_plausibility(systolic: float, graded: bool) -> None:
    ev = evaluate(f.temperature(39.0, NOW), f.systolic(systolic, NOW), f.oxygen_device("none", NOW))
    r = crs(ev)
    if graded:
        assert r.grade == (2 if systolic < 90 else 1)
    else:
        # -50 never counts as hypotension: hypotension is unknown, at least grade 1 from fever.
        assert r.grade is None and r.floor == 1
        assert any("systolic-bp" in m for m in r.missing)


@pytest.mark.parametrize(
    ("concept", "low", "high"),
    [
        (C.BODY_TEMPERATURE, 25.0, 45.0),
        (C.SYSTOLIC_BP, 20.0, 300.0),
        (C.MEAN_ARTERIAL_PRESSURE, 10.0, 250.0),
        (C.SPO2, 0.0, 100.0),
        (C.FIO2, 21.0, 100.0),
        (C.OXYGEN_FLOW, 0.0, 80.0),
        (C.ICE_SCORE, 0, 10),
        (C.CAPD_SCORE, 0, 32),
    ],
)
def test_registry_holds_the_documented_bounds(concept: C, low: float, high: float) -> None:
    assert CONCEPTS[concept].plausible_range == (low, high)


def test_oxygen_flow_above_80_is_left_out() -> None:
    ev = evaluate(
        f.temperature(39.0, NOW),
        f.systolic(120, NOW),
        f.observation(("http://loinc.org", "3151-8"), NOW, valueQuantity=f.quantity(81, "L/min")),
    )
    assert crs(ev).grade is None and crs(ev).floor == 1


# --- dates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        pytest.param("2026-01-06", "date-only", id="date-only"),
        pytest.param("2026-01", "partial date", id="partial"),
        pytest.param("2026-01-06T10:00:00", "no timezone", id="no-timezone"),
    ],
)
def test_untimed_observation_is_left_out_named(when: str, reason: str) -> None:
    ev = evaluate(f.temperature(39.0, when), *NORMAL)
    r = crs(ev)
    # Its time is unknown: it could be in this window, so the grade 0 of the rest is not definite.
    assert r.grade is None
    assert reason in r.rationale
    assert outcome_issues(ev)[0]["expression"] == ["Bundle.entry[1].resource.effectiveDateTime"]
    assert outcome_issues(ev)[0]["severity"] == "warning"


def test_site_timezone_places_a_datetime_without_offset() -> None:
    settings = Settings(site_timezone="Europe/Berlin")
    ev = evaluate(f.temperature(39.0, "2026-01-06T10:00:00"), *NORMAL, settings=settings)
    r = crs(ev)
    assert r.grade == 1
    assert "site timezone Europe/Berlin" in r.rationale
    assert "2026-01-06T10:00+01:00" in r.rationale


def test_site_timezone_must_be_a_known_iana_name() -> None:
    with pytest.raises(ValueError, match="unknown IANA timezone"):
        Settings(site_timezone="Mars/Olympus")


@pytest.mark.parametrize(
    ("birth", "note"),
    [
        pytest.param("1980", "Age 45-46 y (partial birthDate): ICE", id="year-only-adult"),
        pytest.param("1980-05", "Age 45 y", id="year-month"),
        pytest.param("2013", "Age unknown (partial birthDate: age 12-13 y)", id="year-only-straddles-capd"),
        pytest.param("2090-01-01", "Age unknown (no Patient.birthDate)", id="2090"),
        pytest.param("1850-01-01", "Age unknown (no Patient.birthDate)", id="over-130"),
    ],
)
def test_birth_dates(birth: str, note: str) -> None:
    ev = evaluate(f.ice_score(10, NOW), patient={**f.patient(), "birthDate": birth})
    icans = next(r for r in ev.results if r.method == "astct-icans")
    assert note in icans.rationale
    if birth.startswith(("2090", "1850")):
        assert "Patient.birthDate" not in [m for m in icans.missing]
        assert "left out" in icans.rationale.lower()
        assert any(i["expression"] == ["Bundle.entry[0].resource.birthDate"] for i in outcome_issues(ev))


def test_birth_2090_is_not_a_neonate_for_hypotension() -> None:
    ev = evaluate(
        f.temperature(39.0, NOW),
        f.systolic(85, NOW),
        f.oxygen_device("none", NOW),
        patient={**f.patient(), "birthDate": "2090-01-01"},
    )
    r = crs(ev)
    assert r.grade == 2 and "adult rule" in r.rationale


# --- units and scores -----------------------------------------------------------------------------


def test_ice_score_as_a_bare_number_is_graded() -> None:
    ice = f.observation(f.ICE, NOW, valueQuantity={"value": 6})
    icans = next(r for r in evaluate(ice).results if r.method == "astct-icans")
    assert icans.grade == 2


def test_unknown_unit_leaves_the_row_out_not_the_patient() -> None:
    ev = evaluate(f.temperature(312.0, NOW, unit="K"), f.temperature(39.0, NOW), *NORMAL)
    assert crs(ev).grade == 1
    assert outcome_issues(ev)[0]["expression"] == ["Bundle.entry[1].resource.valueQuantity.code"]


# --- strict -------------------------------------------------------------------------------------


def test_strict_is_the_422_with_every_fhirpath() -> None:
    body = f.body(f.patient(), f.temperature(1000.0, NOW), f.temperature(39.0, "2026-01-06"))
    with pytest.raises(FhirError) as err:
        evaluate_body(body, CODEBOOK, SETTINGS, AT, AT, strict=True)
    assert err.value.status == 422
    assert [i.expression for i in err.value.issues] == [
        "Bundle.entry[1].resource.valueQuantity.value",
        "Bundle.entry[2].resource.effectiveDateTime",
    ]
    with pytest.raises(FhirError):
        evaluate_body(body, CODEBOOK, Settings(input_handling="strict"), AT, AT)


def test_subject_not_the_patient_stays_422_when_lenient() -> None:
    with pytest.raises(FhirError) as err:
        evaluate(f.temperature(39.0, NOW, subject="Patient/other"))
    assert err.value.issues[0].expression == "Bundle.entry[1].resource.subject.reference"


def test_warning_outcome_is_in_the_result_bundle_only() -> None:
    ev = evaluate(f.temperature(1000.0, NOW), f.temperature(39.0, NOW), *NORMAL)
    assert all(r["resourceType"] != "OperationOutcome" for r in ev.resources)
    issue = outcome_issues(ev)[0]
    assert issue["severity"] == "warning" and "plausible range" in issue["diagnostics"]


# --- room air -------------------------------------------------------------------------------------


def test_room_air_setting() -> None:
    spo2 = f.observation(("http://loinc.org", "59408-5"), NOW, valueQuantity=f.quantity(97, "%"))
    resources = (f.temperature(39.0, NOW), f.systolic(120, NOW), spo2)
    assert crs(evaluate(*resources)).grade is None  # off by default: oxygen unknown
    on = crs(evaluate(*resources, settings=Settings(room_air_when_spo2_only=True)))
    assert on.grade == 1 and "room air assumed (site setting)" in on.rationale


# --- one bad component of a panel -------------------------------------------------------------------


def test_bad_component_of_a_bp_panel_leaves_only_that_component_out() -> None:
    panel = f.bp_panel(80, 60, NOW, id="bp")
    panel["component"][2]["valueQuantity"] = f.quantity(60, "mm[Hg]x")  # the MAP in an unknown unit
    ev = evaluate(f.temperature(39.0, NOW), f.oxygen_device("none", NOW), panel)
    r = crs(ev)
    # Systolic 80 still counts; the MAP could give no more than grade 2 (no vasopressor): it stands.
    assert r.grade == 2 and "Left out (cannot change this grade)" in r.rationale
    (row,) = ev.left_out
    assert (row.ref, row.path) == ("Observation/bp", "Bundle.entry[3].resource.component[2]")
    assert row.concept == C.MEAN_ARTERIAL_PRESSURE
    assert outcome_issues(ev)[0]["expression"] == ["Bundle.entry[3].resource.component[2].valueQuantity.code"]


def test_bad_systolic_component_keeps_the_map_of_the_panel() -> None:
    panel = f.bp_panel(-50, 120, NOW, id="bp")  # systolic -50 is impossible; the MAP is normal
    ev = evaluate(f.temperature(39.0, NOW), f.oxygen_device("none", NOW), panel)
    r = crs(ev)
    assert r.grade is None and r.floor == 1  # fever; the systolic left out could be hypotension
    assert [row.concept for row in ev.left_out] == [C.SYSTOLIC_BP]
    assert "Observation/bp" in r.considered or "Observation/bp" in r.basis


def test_bad_effective_time_still_leaves_the_whole_panel_out() -> None:
    panel = f.bp_panel(80, 60, "2026-01-06", id="bp")  # date only: no instant for any component
    ev = evaluate(f.temperature(39.0, NOW), f.oxygen_device("none", NOW), panel)
    (row,) = ev.left_out
    assert row.path == "Bundle.entry[3].resource.effectiveDateTime" and crs(ev).grade is None


def test_bad_component_is_a_422_when_strict() -> None:
    panel = f.bp_panel(80, 60, NOW, id="bp")
    panel["component"][2]["valueQuantity"] = f.quantity(60, "mm[Hg]x")
    with pytest.raises(FhirError) as err:
        evaluate_body(f.body(f.patient(), panel), CODEBOOK, SETTINGS, AT, AT, strict=True)
    assert [i.expression for i in err.value.issues] == ["Bundle.entry[1].resource.component[2].valueQuantity.code"]


def test_entry_without_id_or_full_url_is_left_out_not_a_500() -> None:
    # A basis must reference its input: without id and fullUrl there is nothing to reference.
    anonymous = f.temperature(39.0, NOW)
    del anonymous["id"]
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": f.patient()}, {"resource": anonymous}],
    }
    ev = evaluate_body(orjson.dumps(bundle), CODEBOOK, SETTINGS, AT, AT)
    assert [(r.path, r.concept) for r in ev.left_out] == [("Bundle.entry[1].resource.id", C.BODY_TEMPERATURE)]
    assert crs(ev).grade is None
    with pytest.raises(FhirError) as err:
        evaluate_body(orjson.dumps(bundle), CODEBOOK, SETTINGS, AT, AT, strict=True)
    assert err.value.issues[0].expression == "Bundle.entry[1].resource.id"


# --- codes the codebook does not map: counted in every evaluation's warnings -------------------


def test_unmapped_codes_are_counted_in_the_warnings() -> None:
    glucose = [f.observation((f.LOINC, "2339-0"), NOW, valueQuantity=f.quantity(5.5, "mmol/L")) for _ in range(3)]
    drug = f.administration(f.cc(f.RXNORM, "999999"), at=NOW, status="completed")
    ev = evaluate(f.temperature(39.0, NOW), *NORMAL, *glucose, drug)
    info = [i for i in outcome_issues(ev) if i["severity"] == "information"]
    why = "codings not mapped by the codebook (not inputs to grading; map them with a site overlay)"
    assert [(i["expression"], i["diagnostics"].split(":")[0]) for i in info] == [
        (["MedicationAdministration"], f"1 MedicationAdministration {why}"),
        (["Observation"], f"3 Observation {why}"),
    ]
    assert "http://loinc.org|2339-0 (3)" in info[1]["diagnostics"]
    assert not ev.left_out and crs(ev).grade == 1  # not inputs: nothing is indeterminate for them


def test_no_warnings_outcome_when_everything_is_mapped_and_used() -> None:
    assert evaluate(f.temperature(39.0, NOW), *NORMAL).outcome is None


def test_a_component_that_is_not_an_object_is_left_out_named() -> None:
    panel = f.bp_panel(80, 60, NOW, id="bp")
    panel["component"].append("junk")
    ev = evaluate(f.temperature(39.0, NOW), f.oxygen_device("none", NOW), panel)
    # unreadable: it could have been any value of the panel, so it takes the panel's concept
    assert [(r.path, r.concept) for r in ev.left_out] == [("Bundle.entry[3].resource.component[3]", C.SYSTOLIC_BP)]
    assert crs(ev).grade == 2


# --- supported years (a charting error outside them, never window arithmetic off the calendar) ----


@pytest.mark.parametrize(
    ("when", "left_out"),
    [
        pytest.param("1899-12-31T23:59:00+00:00", True, id="1899-below"),
        pytest.param("1900-01-01T00:00:00+00:00", False, id="1900-on"),
        pytest.param("2199-12-31T23:59:00+00:00", False, id="2199-on"),
        pytest.param("2200-01-01T00:00:00+00:00", True, id="2200-above"),
    ],
)
def test_supported_years_boundaries(when: str, left_out: bool) -> None:
    ev = evaluate(f.temperature(37.0, when, id="edge"), *NORMAL)
    assert ("Observation/edge" in [r.ref for r in ev.left_out]) is left_out
