"""Codes and shapes real EHRs send (issue 10 items 1-2): body-site temperatures, invasive
pressures, pulse-oximetry components, Medications by product and by ingredient, drips charted
as events, mL/h with the bag's concentration, rateRatio and unit spellings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.app.evaluate import EVALUATE_BUNDLE_TYPES, Evaluation, evaluate_body
from service.codebook import load_codebook
from service.config.settings import Settings
from service.core.model import PatientData
from service.core.units import UNIT_ALIASES, converter
from service.fhir.ingest import parse_patient_entries, split_entries

try:
    from tests import factories as f
except ImportError:  # pragma: no cover - depends on pytest rootdir/import mode
    import factories as f  # type: ignore[no-redef]

SETTINGS = Settings()
CODEBOOK = load_codebook(SETTINGS.canonical_base)
AT = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)
RECORDED = datetime(2026, 1, 6, 12, 5, tzinfo=UTC)
NOW = "2026-01-06T10:00:00+00:00"
EHR = "https://ehr.example.org/fhir"
NE_PRODUCT = "242969"  # 4 ML norepinephrine 1 MG/ML Injection (openFDA NDC 0143-9318: rxcui 242969)


def h(hours: float) -> str:
    return (AT - timedelta(hours=hours)).isoformat()


def entries_of(*resources: dict[str, Any], full_urls: dict[int, str] | None = None) -> dict[str, Any]:
    doc = f.bundle(f.patient(), *resources)
    for i, url in (full_urls or {}).items():
        doc["entry"][i + 1]["fullUrl"] = url
    return doc


def parse_doc(doc: dict[str, Any], *, strict: bool = True) -> PatientData:
    entries = split_entries(doc, max_entries=SETTINGS.max_bundle_entries, bundle_types=EVALUATE_BUNDLE_TYPES)
    return parse_patient_entries(entries, CODEBOOK, strict=strict).data


def parse(*resources: dict[str, Any], strict: bool = True) -> PatientData:
    return parse_doc(entries_of(*resources), strict=strict)


def evaluate_doc(doc: dict[str, Any], settings: Settings = SETTINGS) -> Evaluation:
    import orjson

    return evaluate_body(orjson.dumps(doc), CODEBOOK, settings, AT, RECORDED)


def evaluate(*resources: dict[str, Any], settings: Settings = SETTINGS) -> Evaluation:
    return evaluate_doc(entries_of(*resources), settings)


def normal_vitals() -> tuple[dict[str, Any], ...]:
    return f.systolic(120, NOW), f.oxygen_device("none", NOW)


def medication(
    mid: str, code: tuple[str, str] | None = None, *, ingredients: list[Any] | None = None, text: str | None = None
) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "Medication", "id": mid}
    if code is not None or text is not None:
        res["code"] = f.cc(*code, text=text) if code is not None else {"text": text}
    if ingredients is not None:
        res["ingredient"] = ingredients
    return res


def ingredient(rxcui: str | None, strength: tuple[float, str, float, str] | None = None) -> dict[str, Any]:
    ing: dict[str, Any] = {"itemCodeableConcept": f.cc(f.RXNORM, rxcui) if rxcui else {"text": "unknown"}}
    if strength is not None:
        n, nu, d, du = strength
        ing["strength"] = {"numerator": f.quantity(n, nu), "denominator": f.quantity(d, du)}
    return ing


def by_reference(ref: str, **kwargs: Any) -> dict[str, Any]:
    ma = f.administration("norepinephrine", **kwargs)
    del ma["medicationCodeableConcept"]
    ma["medicationReference"] = {"reference": ref}
    return ma


# --- 1. Observation codes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    ["8331-1", "8328-7", "8333-7", "8332-9", "8329-5", "75539-7", "60836-4", "8310-5"],
    ids=["oral", "axillary", "tympanic", "rectal", "core", "temporal-artery", "esophageal", "body"],
)
def test_body_site_temperature_is_a_fever(code: str) -> None:
    temp = f.observation((f.LOINC, code), NOW, valueQuantity=f.quantity(39.0, "Cel"))
    crs = evaluate(temp, *normal_vitals()).results[0]
    assert crs.grade == 1
    assert crs.crs is not None and crs.crs.fever_present is True


def test_oral_temperature_after_tocilizumab_on_two_pressors_is_4() -> None:
    """The reported bug: Synthea-style oral temperature (8331-1), two vasopressors: ASTCT 4, not 0."""
    temp = f.observation((f.LOINC, "8331-1"), h(4), valueQuantity=f.quantity(39.2, "Cel"))
    ev = evaluate(
        temp,
        f.administration("tocilizumab", at=h(3), status="completed"),
        f.administration("norepinephrine", start=h(6)),
        f.administration("epinephrine", start=h(5)),
    )
    assert ev.results[0].grade == 4


@pytest.mark.parametrize(
    ("code", "value", "grade"),
    [
        pytest.param("76215-3", 80, 2, id="arterial-line-systolic-low"),
        pytest.param("76215-3", 120, 1, id="arterial-line-systolic-normal"),
        pytest.param("76534-7", 80, 2, id="noninvasive-systolic"),
        pytest.param("8459-0", 80, 2, id="sitting-systolic"),
        pytest.param("76214-6", 60, 2, id="arterial-line-map-low"),
        pytest.param("76536-2", 60, 2, id="noninvasive-map-low"),
    ],
)
def test_pressure_codes(code: str, value: float, grade: int) -> None:
    bp = f.observation((f.LOINC, code), NOW, valueQuantity=f.quantity(value, "mm[Hg]"))
    extra = () if code in ("76215-3", "76534-7", "8459-0") else (f.systolic(120, NOW),)
    ev = evaluate(f.temperature(39.0, NOW), bp, *extra, f.oxygen_device("none", NOW))
    assert ev.results[0].grade == grade


def test_spo2_with_flow_and_concentration_components_us_core_shape() -> None:
    """US Core pulse oximetry: SpO2 59408-5 (+ 2708-6) with inhaled O2 flow and concentration components."""
    ox = f.observation((f.LOINC, "59408-5"), NOW, valueQuantity=f.quantity(93, "%"))
    ox["code"]["coding"].append({"system": f.LOINC, "code": "2708-6"})
    ox["component"] = [
        {"code": f.cc(f.LOINC, "3151-8"), "valueQuantity": f.quantity(4, "L/min")},
        {"code": f.cc(f.LOINC, "3150-0"), "valueQuantity": f.quantity(36, "%")},
    ]
    data = parse(ox)
    assert [s.value for s in data.series("spo2")] == [93]
    assert [s.value for s in data.series("oxygen-flow")] == [4]
    assert [s.value for s in data.series("fio2")] == [36]
    assert evaluate(f.temperature(39.0, NOW), f.systolic(120, NOW), ox).results[0].grade == 2


def test_flow_and_concentration_as_separate_observations() -> None:
    flow = f.observation((f.LOINC, "3151-8"), NOW, valueQuantity=f.quantity(8, "L/min"))
    fio2 = f.observation((f.LOINC, "3150-0"), NOW, valueQuantity=f.quantity(0.5, "1"))
    spo2 = f.observation((f.LOINC, "2708-6"), NOW, valueQuantity=f.quantity(0.95, "1"))
    data = parse(flow, fio2, spo2)
    assert [s.value for s in data.series("fio2")] == [50]
    assert [s.value for s in data.series("spo2")] == [95]
    assert evaluate(f.temperature(39.0, NOW), f.systolic(120, NOW), flow).results[0].grade == 3


# --- Unit aliases -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obs", "concept", "value"),
    [
        pytest.param(f.temperature(102.2, NOW, unit="degF"), "body-temperature", 39.0, id="degF"),
        pytest.param(f.temperature(39.0, NOW, unit="°C"), "body-temperature", 39.0, id="degree-C"),
        pytest.param(
            f.observation(f.SYSTOLIC, NOW, valueQuantity=f.quantity(85, None, unit="mmHg")),
            "systolic-bp",
            85,
            id="mmHg-as-unit-text",
        ),
        pytest.param(
            f.observation(f.SYSTOLIC, NOW, valueQuantity=f.quantity(85, "mmHg")), "systolic-bp", 85, id="mmHg-as-code"
        ),
    ],
)
def test_alias_units_are_read(obs: dict[str, Any], concept: str, value: float) -> None:
    (s,) = parse(obs).series(concept)
    assert s.value == pytest.approx(value)


def test_alias_table_has_no_ambiguous_spellings_and_maps_onto_accepted_codes() -> None:
    for ambiguous in ("C", "F", "mcg", "u"):
        assert ambiguous not in UNIT_ALIASES
    assert converter("norepinephrine", "mcg/kg/min")(0.1, 80.0) == pytest.approx(8.0)
    assert converter("vasopressin", "units/min")(0.03, None) == pytest.approx(0.03)


def test_mcg_kg_min_rate_with_weight() -> None:
    ne = f.administration("norepinephrine", start=h(6), rate=(0.1, "mcg/kg/min"))
    weight = f.observation(f.BODY_WEIGHT, h(48), valueQuantity=f.quantity(80, "kg"))
    (adm,) = parse(weight, ne).given("norepinephrine")
    assert adm.rate == pytest.approx(8.0)
    assert adm.shown == "0.1 mcg/kg/min"


# --- Medications: product, ingredient, references ----------------------------------------------


def test_product_code_by_relative_reference() -> None:
    data = parse(medication("med1", (f.RXNORM, NE_PRODUCT)), by_reference("Medication/med1", start=h(6)))
    assert len(data.given("norepinephrine")) == 1


def test_product_code_by_absolute_reference() -> None:
    doc = entries_of(
        medication("med1", (f.RXNORM, NE_PRODUCT)),
        by_reference(f"{EHR}/Medication/med1", start=h(6)),
        full_urls={0: f"{EHR}/Medication/med1", 1: f"{EHR}/MedicationAdministration/ma1"},
    )
    assert len(parse_doc(doc).given("norepinephrine")) == 1


def test_absolute_reference_on_the_administrations_base_without_a_full_url_on_the_medication() -> None:
    doc = entries_of(
        medication("med1", (f.RXNORM, NE_PRODUCT)),
        by_reference(f"{EHR}/Medication/med1", start=h(6)),
        full_urls={0: "urn:uuid:11111111-1111-1111-1111-111111111111", 1: f"{EHR}/MedicationAdministration/ma1"},
    )
    assert len(parse_doc(doc).given("norepinephrine")) == 1


def test_absolute_reference_to_another_server_is_not_taken_for_a_local_id() -> None:
    doc = entries_of(
        medication("med1", (f.RXNORM, NE_PRODUCT)),
        by_reference("https://other.example.org/fhir/Medication/med1", start=h(6), id="ma-other"),
        full_urls={0: "urn:uuid:11111111-1111-1111-1111-111111111111", 1: f"{EHR}/MedicationAdministration/ma1"},
    )
    data = parse_doc(doc, strict=False)
    assert data.given("norepinephrine") == []
    assert [row.concept for row in data.left_out] == ["medication"]


def test_product_code_by_urn_uuid_reference() -> None:
    urn = "urn:uuid:2f1c2a2e-0000-4000-8000-000000000001"
    med = medication("med1", (f.RXNORM, NE_PRODUCT))
    del med["id"]
    doc = entries_of(med, by_reference(urn, start=h(6)), full_urls={0: urn})
    assert len(parse_doc(doc).given("norepinephrine")) == 1


def test_product_code_by_contained_reference() -> None:
    ma = by_reference("#m", start=h(6))
    ma["contained"] = [medication("m", (f.RXNORM, NE_PRODUCT))]
    assert len(parse(ma).given("norepinephrine")) == 1


def test_drug_only_in_medication_ingredient() -> None:
    med = medication("med1", text="Levophed drip (premix)", ingredients=[ingredient("7512")])
    assert len(parse(med, by_reference("Medication/med1", start=h(6))).given("norepinephrine")) == 1


def test_product_and_ingredient_pressors_together_are_4() -> None:
    """The reported bug: norepinephrine by product code and epinephrine by ingredient only (grade 3 before)."""
    epi = medication("epi", text="EPINEPHrine infusion", ingredients=[ingredient("3992")])
    epi_ma = by_reference("Medication/epi", start=h(5))
    ev = evaluate(
        f.temperature(39.0, NOW),
        medication("ne", (f.RXNORM, NE_PRODUCT)),
        by_reference("Medication/ne", start=h(6)),
        epi,
        epi_ma,
    )
    assert ev.results[0].grade == 4


def test_medication_missing_from_the_bundle_is_left_out_and_named() -> None:
    data = parse(by_reference("Medication/absent", start=h(6), id="ma-x"), strict=False)
    assert data.administrations == {}
    (row,) = data.left_out
    assert row.ref == "MedicationAdministration/ma-x"
    assert row.concept == "medication"
    assert row.path == "Bundle.entry[1].resource.medicationReference.reference"
    assert "'Medication/absent' not resolved" in row.reason and "left out" in row.reason


def test_medication_missing_is_422_when_strict() -> None:
    from service.fhir.errors import FhirError

    with pytest.raises(FhirError) as err:
        parse(by_reference("Medication/absent", start=h(6), id="ma-x"))
    assert [i.expression for i in err.value.issues] == ["Bundle.entry[1].resource.medicationReference.reference"]


def test_unresolved_medication_in_a_febrile_patient_makes_crs_indeterminate_not_lower() -> None:
    """It could be a vasopressor: fever alone proves grade 1, the unknown drug could make it 3 or 4."""
    ev = evaluate(f.temperature(39.0, NOW), by_reference("Medication/absent", start=h(6), id="ma-x"), *normal_vitals())
    crs = ev.results[0]
    assert crs.method == "astct-crs" and crs.grade is None and crs.floor == 1
    assert any("ma-x" in m for m in crs.missing)


# --- 2. Infusions charted as events ---------------------------------------------------------------


def test_two_pressors_charted_as_events_without_end_overlap_and_grade_4() -> None:
    """Cerner/Synthea shape: completed events with a start and no end (the bug: never concurrent)."""
    ev = evaluate(
        f.temperature(39.0, NOW),
        f.administration("norepinephrine", at=h(6), status="completed", id="ne1", rate=(5, "ug/min")),
        f.administration("norepinephrine", at=h(5), status="completed", id="ne2", rate=(10, "ug/min")),
        f.administration("epinephrine", start=h(4.5), status="completed", id="epi1", rate=(2, "ug/min")),
        f.administration("norepinephrine", at=h(4), status="completed", id="ne3", rate=(8, "ug/min")),
        *normal_vitals(),
    )
    crs = ev.results[0]
    assert crs.grade == 4
    assert "taken as running from" in crs.rationale


def test_event_episode_segments_carry_rate_over_time() -> None:
    data = parse(
        f.administration("norepinephrine", at=h(6), status="completed", id="ne1", rate=(5, "ug/min")),
        f.administration("norepinephrine", at=h(5), status="completed", id="ne2", rate=(10, "ug/min")),
        f.administration("norepinephrine", at=h(4), status="stopped", id="ne3"),
    )
    segs = [(a.start, a.end, a.rate) for a in data.given("norepinephrine")]
    t = datetime.fromisoformat
    assert segs == [(t(h(6)), t(h(5)), 5.0), (t(h(5)), t(h(4)), 10.0), (t(h(4)), t(h(4)), None)]
    notes = [i.reason for i in data.ignored]
    assert notes[0] == (
        "completed event without an end: taken as running from 2026-01-06T06:00+00:00"
        " until the next norepinephrine event at 2026-01-06T07:00+00:00"
    )


@pytest.mark.parametrize(
    ("epi_start", "cap", "grade"),
    [
        pytest.param(7, None, 4, id="overlap-within-cap"),  # norepinephrine runs h10-h6
        pytest.param(5, None, 3, id="after-the-4h-cap"),
        pytest.param(5, 12.0, 4, id="cap-raised-to-12h"),
    ],
)
def test_event_without_next_runs_at_most_the_cap(epi_start: float, cap: float | None, grade: int) -> None:
    settings = SETTINGS if cap is None else Settings(infusion_event_max_hours=cap)
    ev = evaluate(
        f.temperature(39.0, NOW),
        f.administration("norepinephrine", at=h(10), status="completed"),
        f.administration("epinephrine", start=h(epi_start)),
        *normal_vitals(),
        settings=settings,
    )
    assert ev.results[0].grade == grade


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param({"status": "stopped"}, id="status-stopped"),
        pytest.param({"status": "completed", "rate": (0, "ug/min")}, id="rate-0"),
    ],
)
def test_a_stop_ends_the_episode(stop: dict[str, Any]) -> None:
    ev = evaluate(
        f.temperature(39.0, NOW),
        f.administration("norepinephrine", at=h(6), status="completed", rate=(5, "ug/min")),
        f.administration("norepinephrine", at=h(5), **stop),
        f.administration("epinephrine", start=h(4)),
        *normal_vitals(),
    )
    assert ev.results[0].grade == 3


def test_in_progress_last_event_without_end_is_still_running() -> None:
    data = parse(
        f.administration("norepinephrine", start=h(30), status="completed", id="a"),
        f.administration("norepinephrine", start=h(29), id="b"),  # in-progress, nothing after it
    )
    first, last = data.given("norepinephrine")
    assert first.end == datetime.fromisoformat(h(29))
    assert last.end is None


def test_non_vasopressor_completed_without_end_still_counts_at_its_start_only() -> None:
    data = parse(f.administration("tocilizumab", start=h(30), status="completed", id="toci"))
    (adm,) = data.given("tocilizumab")
    assert adm.start == adm.end
    assert [i.reason for i in data.ignored] == ["completed without an end: counted at its start only"]


# --- mL/h, rateRatio -----------------------------------------------------------------------------


def test_ml_per_hour_with_strength_is_converted() -> None:
    med = medication("ne", (f.RXNORM, NE_PRODUCT), ingredients=[ingredient("7512", (4, "mg", 250, "mL"))])
    ma = by_reference("Medication/ne", start=h(6), rate=(15, "mL/h"))
    (adm,) = parse(med, ma).given("norepinephrine")
    assert adm.rate == pytest.approx(4.0)  # 15 mL/h x 4 mg / 250 mL = 240 ug/h = 4 ug/min
    assert adm.shown == "15 mL/h of 4 mg/250 mL"


def test_ml_per_hour_for_vasopressin_in_units() -> None:
    med = medication("v", (f.RXNORM, "11149"), ingredients=[ingredient("11149", (20, "[USP'U]", 100, "mL"))])
    ma = by_reference("Medication/v", start=h(6), rate=(9, "ml/hr"))
    (adm,) = parse(med, ma).given("vasopressin")
    assert adm.rate == pytest.approx(0.03)  # 9 mL/h x 0.2 U/mL = 1.8 U/h = 0.03 U/min


def test_ml_per_hour_without_strength_counts_as_running_rate_unknown() -> None:
    med = medication("ne", (f.RXNORM, NE_PRODUCT))
    ma = by_reference("Medication/ne", start=h(6), rate=(15, "mL/h"), id="ma-ne")
    data = parse(med, ma)
    (adm,) = data.given("norepinephrine")
    assert adm.rate is None
    assert [i.reason for i in data.ignored] == ["rate 15 mL/h without a concentration: rate unknown"]
    assert evaluate(f.temperature(39.0, NOW), med, ma, *normal_vitals()).results[0].grade == 3


def test_rate_ratio_is_read_like_rate_quantity() -> None:
    ma = f.administration("norepinephrine", start=h(6))
    ma["dosage"] = {"rateRatio": {"numerator": f.quantity(5, None, unit="mcg"), "denominator": f.quantity(1, "min")}}
    (adm,) = parse(ma).given("norepinephrine")
    assert adm.rate == pytest.approx(5.0)


def test_rate_ratio_with_a_non_time_denominator_is_422_when_strict_left_out_when_lenient() -> None:
    from service.fhir.errors import FhirError

    ma = f.administration("norepinephrine", start=h(6))
    ma["dosage"] = {"rateRatio": {"numerator": f.quantity(5, "ug"), "denominator": f.quantity(1, "mL")}}
    with pytest.raises(FhirError) as err:
        evaluate(ma, settings=SETTINGS.model_copy(update={"input_handling": "strict"}))
    path = "Bundle.entry[1].resource.dosage.rateRatio.denominator.code"
    assert [i.expression for i in err.value.issues] == [path]
    lenient = evaluate(ma)
    assert any(row.path == path for row in lenient.left_out)
