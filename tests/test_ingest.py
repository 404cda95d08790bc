"""FHIR in: statuses, versions, times, units and errors, through the lean adapter and `$evaluate`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from service.app.evaluate import EVALUATE_BUNDLE_TYPES, SCALES, Evaluation, evaluate_body
from service.codebook import load_codebook
from service.config.settings import Settings
from service.core.model import PatientData
from service.fhir.errors import FhirError
from service.fhir.ingest import parse_patient_entries, split_entries

try:
    from tests import factories as f
except ImportError:  # pragma: no cover - depends on pytest rootdir/import mode
    import factories as f  # type: ignore[no-redef]

SETTINGS = Settings()
CODEBOOK = load_codebook(SETTINGS.canonical_base)
AT = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)
RECORDED = datetime(2026, 1, 6, 12, 5, tzinfo=UTC)
NOW = "2026-01-06T10:00:00+00:00"  # 2 h before AT
DAY0 = "2026-01-03T12:00:00+00:00"
DAY1 = "2026-01-04T12:00:00+00:00"


def h(hours: int) -> str:
    """An ISO time `hours` before AT (hours > 0) or after it (hours < 0)."""
    return datetime.fromtimestamp(AT.timestamp() - hours * 3600, tz=UTC).isoformat()


def parse(*resources: dict[str, Any]) -> PatientData:
    doc = f.bundle(f.patient(), *resources)
    entries = split_entries(doc, max_entries=SETTINGS.max_bundle_entries, bundle_types=EVALUATE_BUNDLE_TYPES)
    return parse_patient_entries(entries, CODEBOOK).data


def evaluate(*resources: dict[str, Any], settings: Settings = SETTINGS) -> Evaluation:
    return evaluate_body(f.body(f.patient(), *resources), CODEBOOK, settings, AT, RECORDED)


def fails(body: bytes, settings: Settings = SETTINGS) -> FhirError:
    """Strict handling (`Prefer: handling=strict`): bad input is a 422 with every FHIRPath."""
    with pytest.raises(FhirError) as err:
        evaluate_body(body, CODEBOOK, settings, AT, RECORDED, strict=True)
    return err.value


def normal_vitals() -> tuple[dict[str, Any], ...]:
    return f.systolic(120, NOW), f.oxygen_device("none", NOW)


# --- Observation.status -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "used"),
    [
        pytest.param("final", True, id="final"),
        pytest.param("amended", True, id="amended"),
        pytest.param("corrected", True, id="corrected"),
        pytest.param("registered", False, id="registered"),
        pytest.param("preliminary", False, id="preliminary"),
        pytest.param("cancelled", False, id="cancelled"),
        pytest.param("entered-in-error", False, id="entered-in-error"),
        pytest.param("unknown", False, id="unknown"),
    ],
)
def test_observation_status(status: str, used: bool) -> None:
    fever = f.temperature(39.0, NOW, id="fever", status=status)
    data = parse(fever, *normal_vitals())
    ev = evaluate(fever, *normal_vitals())
    crs = ev.results[0]
    if used:
        assert [s.ref for s in data.series("body-temperature")] == ["Observation/fever"]
        assert data.ignored == []
        assert crs.grade == 1
        assert "Observation/fever" in crs.basis
    else:
        assert data.series("body-temperature") == []
        assert [(i.ref, i.reason, i.concept) for i in data.ignored] == [
            ("Observation/fever", f"status {status}", "body-temperature")
        ]
        assert crs.grade is None  # the fever is not used: no temperature, never 0
        assert f"Ignored: Observation/fever (body-temperature: status {status})" in crs.rationale
        assert crs.missing == ("body-temperature",)


def test_ice_entered_in_error_leaves_icans_indeterminate() -> None:
    score = f.ice_score(2, NOW, id="ice-bad", status="entered-in-error")
    data = parse(score)
    assert [i.ref for i in data.ignored] == ["Observation/ice-bad"]
    icans = evaluate(score).results[1]
    assert icans.grade is None
    assert "ice-score" in icans.missing


def test_unknown_observation_status_is_422_with_path() -> None:
    err = fails(f.body(f.patient(), f.temperature(39.0, NOW, status="bogus")))
    assert err.status == 422
    assert [i.expression for i in err.issues] == ["Bundle.entry[1].resource.status"]
    assert "bogus" in err.issues[0].diagnostics


def test_observation_with_unmapped_code_is_not_an_input() -> None:
    heart_rate = f.observation((f.LOINC, "8867-4"), NOW, status="bogus", valueQuantity=f.quantity(120, "/min"))
    assert parse(heart_rate).samples == {}


# --- MedicationAdministration -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "used"),
    [
        pytest.param("in-progress", True, id="in-progress"),
        pytest.param("completed", True, id="completed"),
        pytest.param("stopped", True, id="stopped"),
        pytest.param("not-done", False, id="not-done"),
        pytest.param("entered-in-error", False, id="entered-in-error"),
        pytest.param("on-hold", False, id="on-hold"),
        pytest.param("unknown", False, id="unknown"),
    ],
)
def test_administration_status(status: str, used: bool) -> None:
    ne = f.administration("norepinephrine", start=h(6), end=h(1), id="ne", status=status)
    data = parse(ne)
    crs = evaluate(f.temperature(39.0, NOW), *normal_vitals(), ne).results[0]
    if used:
        assert [a.ref for a in data.given("norepinephrine")] == ["MedicationAdministration/ne"]
        assert crs.grade == 3
    else:
        assert data.given("norepinephrine") == []
        assert [(i.ref, i.reason) for i in data.ignored] == [("MedicationAdministration/ne", f"status {status}")]
        assert "MedicationAdministration/ne (norepinephrine: status" in crs.rationale
        assert crs.grade == 1  # graded on the (normal) blood pressure


def test_unknown_administration_status_is_422_with_path() -> None:
    err = fails(f.body(f.patient(), f.administration("norepinephrine", start=h(3), status="paused")))
    assert err.status == 422
    assert [i.expression for i in err.issues] == ["Bundle.entry[1].resource.status"]


@pytest.mark.parametrize(
    ("kwargs", "grade"),
    [
        pytest.param({"start": h(30), "end": h(25)}, 1, id="period-ended-before-window"),
        pytest.param({"start": h(30), "end": h(20)}, 3, id="period-ends-inside-window"),
        pytest.param({"start": h(10), "end": h(8)}, 3, id="period-inside-window"),
        pytest.param({"at": h(30)}, 1, id="datetime-before-window"),
        pytest.param({"at": h(3)}, 3, id="datetime-inside-window"),
    ],
)
def test_stopped_counts_only_for_its_period(kwargs: dict[str, str], grade: int) -> None:
    ne = f.administration("norepinephrine", status="stopped", **kwargs)
    assert evaluate(f.temperature(39.0, NOW), *normal_vitals(), ne).results[0].grade == grade


def test_period_without_end_is_ongoing() -> None:
    ne = f.administration("norepinephrine", start=h(72))  # started 3 days ago, no end
    (adm,) = parse(ne).given("norepinephrine")
    assert adm.start == datetime.fromisoformat(h(72))
    assert adm.end is None
    assert evaluate(f.temperature(39.0, NOW), *normal_vitals(), ne).results[0].grade == 3


def test_effective_datetime_is_accepted() -> None:
    dose = f.administration("tocilizumab", at=DAY1, status="completed")
    (adm,) = parse(dose).given("tocilizumab")
    assert adm.start == adm.end == datetime.fromisoformat(DAY1)


def test_two_overlapping_pressors_through_fhir_is_4() -> None:
    ev = evaluate(
        f.temperature(39.0, NOW),
        f.administration("norepinephrine", start=h(6)),
        f.administration("vasopressin", start=h(5), rate=(0.03, "[iU]/min")),
        f.administration("epinephrine", start=h(4)),
    )
    assert ev.results[0].grade == 4


def test_vasopressor_rate_is_normalised_with_weight() -> None:
    ne = f.administration("norepinephrine", start=h(6), rate=(0.1, "ug/kg/min"))
    weight = f.observation(f.BODY_WEIGHT, h(48), valueQuantity=f.quantity(80, "kg"))
    (adm,) = parse(weight, ne).given("norepinephrine")
    assert adm.rate == pytest.approx(8.0)  # ug/min
    assert adm.shown == "0.1 ug/kg/min"


def test_weight_based_rate_without_weight_is_listed_not_guessed() -> None:
    ne = f.administration("norepinephrine", start=h(6), id="ne", rate=(0.1, "ug/kg/min"))
    data = parse(ne)
    (adm,) = data.given("norepinephrine")
    assert adm.rate is None
    assert [i.ref for i in data.ignored] == ["MedicationAdministration/ne"]


# --- versions: newest meta.versionId, else meta.lastUpdated ---------------------------------


def _version(value: float, meta: dict[str, str]) -> dict[str, Any]:
    return f.temperature(value, NOW, id="t1", meta=meta)


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        pytest.param({"versionId": "1"}, {"versionId": "2"}, id="versionId-1-2"),
        pytest.param({"versionId": "2"}, {"versionId": "10"}, id="versionId-numeric-2-10"),
        pytest.param(
            {"versionId": "1", "lastUpdated": "2026-01-06T11:00:00+00:00"},
            {"versionId": "2", "lastUpdated": "2026-01-06T10:00:00+00:00"},
            id="versionId-beats-lastUpdated",
        ),
        pytest.param(
            {"lastUpdated": "2026-01-06T10:00:00+00:00"},
            {"lastUpdated": "2026-01-06T10:00:01+00:00"},
            id="lastUpdated-1s",
        ),
        pytest.param(
            {"lastUpdated": "2026-01-06T11:00:00+02:00"},  # 09:00 UTC
            {"lastUpdated": "2026-01-06T10:00:00+00:00"},
            id="lastUpdated-offsets-compared-as-instants",
        ),
        pytest.param(
            {"lastUpdated": "2026-01-06T10:00:00Z"},
            {"lastUpdated": "2026-01-06T10:00:00.500+00:00"},
            id="lastUpdated-Z-and-fraction",
        ),
        pytest.param({}, {"lastUpdated": "2026-01-06T10:00:00+00:00"}, id="no-meta-is-oldest"),
    ],
)
@pytest.mark.parametrize("newer_first", [False, True], ids=["newer-last", "newer-first"])
def test_same_id_keeps_newest_version(older: dict[str, str], newer: dict[str, str], newer_first: bool) -> None:
    old, new = _version(37.0, older), _version(39.0, newer)
    data = parse(*((new, old) if newer_first else (old, new)))
    assert [s.value for s in data.series("body-temperature")] == [39.0]


def test_same_id_different_type_is_not_a_version() -> None:
    temp = f.temperature(39.0, NOW, id="x1")
    dose = f.administration("tocilizumab", at=DAY1, id="x1")
    data = parse(temp, dose)
    assert len(data.series("body-temperature")) == 1
    assert len(data.given("tocilizumab")) == 1


# --- bad input: FhirError with status and FHIRPath -----------------------------------------


def _doc(*resources: dict[str, Any]) -> bytes:
    return f.body(f.patient(), *resources)


def _without(res: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != key}


BAD_INPUT = [
    pytest.param(b'{"resourceType": "Bundle", "type": ', SETTINGS, 400, None, id="malformed-json"),
    pytest.param(b"[1, 2]", SETTINGS, 400, None, id="json-array"),
    pytest.param(
        _doc({"resourceType": "Observatoin", "id": "o1"}),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.resourceType",
        id="unknown-resourceType",
    ),
    pytest.param(
        _doc({"resourceType": "Quantity", "id": "o1"}),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.resourceType",
        id="datatype-as-resourceType",
    ),
    pytest.param(
        _doc(_without(f.temperature(39.0, NOW), "status")),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.status",
        id="missing-observation-status",
    ),
    pytest.param(
        _doc(f.temperature(39.0, "2026-01-06T10:00:00")),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.effectiveDateTime",
        id="datetime-without-timezone",
    ),
    pytest.param(
        _doc(f.temperature(39.0, "2026-01-06")),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.effectiveDateTime",
        id="date-without-time",
    ),
    pytest.param(
        _doc(f.temperature(39.0, "yesterday")),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.effectiveDateTime",
        id="datetime-junk",
    ),
    pytest.param(
        _doc(f.temperature(312.0, NOW, unit="K")),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.valueQuantity.code",
        id="unknown-unit",
    ),
    pytest.param(
        _doc(f.observation(f.TEMPERATURE, NOW, valueQuantity=f.quantity(39.0, None))),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.valueQuantity.code",
        id="quantity-without-unit",
    ),
    pytest.param(
        _doc(f.observation(f.TEMPERATURE, NOW, valueQuantity=f.quantity(39.0, "C", system="http://example.org/u"))),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.valueQuantity.system",
        id="non-ucum-system",
    ),
    pytest.param(
        _doc(f.observation(f.TEMPERATURE, NOW, valueQuantity={"value": "39", "code": "Cel"})),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.valueQuantity.value",
        id="quantity-value-string",
    ),
    pytest.param(_doc(f.ice_score(11, NOW)), SETTINGS, 422, "Bundle.entry[1].resource", id="ice-11"),
    pytest.param(_doc(f.ice_score(-1, NOW)), SETTINGS, 422, "Bundle.entry[1].resource", id="ice-minus-1"),
    pytest.param(
        _doc(f.observation(f.CAPD, NOW, valueInteger=33)), SETTINGS, 422, "Bundle.entry[1].resource", id="capd-33"
    ),
    pytest.param(
        _doc(f.temperature(39.0, NOW, subject="Patient/other")),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.subject.reference",
        id="subject-other-patient",
    ),
    pytest.param(
        _doc(_without(f.temperature(39.0, NOW), "subject")),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.subject",
        id="no-subject",
    ),
    pytest.param(_doc(f.patient("p2")), SETTINGS, 422, "Bundle.entry.resource.ofType(Patient)", id="two-patients"),
    pytest.param(
        f.body(f.temperature(39.0, NOW)), SETTINGS, 422, "Bundle.entry.resource.ofType(Patient)", id="no-patient"
    ),
    pytest.param(
        _doc(f.temperature(39.0, NOW), f.temperature(38.0, NOW), f.temperature(37.0, NOW)),
        Settings(max_bundle_entries=3),
        413,
        "Bundle.entry",
        id="bundle-over-max-entries",
    ),
    pytest.param(
        orjson.dumps({**f.bundle(f.patient()), "type": "document"}),
        SETTINGS,
        422,
        "Bundle.type",
        id="bundle-type-document",
    ),
    pytest.param(
        _doc(f.administration("norepinephrine", start=NOW, rate=(5, "ug/s"))),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.dosage.rateQuantity.code",
        id="pressor-rate-unknown-unit",
    ),
    pytest.param(
        _doc(f.administration("norepinephrine", start="2026-01-06T10:00")),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.effectivePeriod.start",
        id="period-start-without-timezone",
    ),
    pytest.param(
        _doc(f.administration("norepinephrine", start=h(1), end=h(2))),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.effectivePeriod.end",
        id="period-end-before-start",
    ),
    pytest.param(
        _doc(f.coded("seizure", "mild", NOW)),
        SETTINGS,
        422,
        "Bundle.entry[1].resource.valueCodeableConcept",
        id="coded-value-not-in-codebook",
    ),
]


@pytest.mark.parametrize(("body", "settings", "status", "expression"), BAD_INPUT)
def test_bad_input(body: bytes, settings: Settings, status: int, expression: str | None) -> None:
    err = fails(body, settings)
    assert err.status == status
    assert err.issues
    assert err.issues[0].expression == expression
    assert all(i.severity == "error" and i.diagnostics for i in err.issues)


def test_unknown_unit_names_accepted_units() -> None:
    err = fails(_doc(f.temperature(312.0, NOW, unit="K")))
    assert "Cel" in err.issues[0].diagnostics
    assert "[degF]" in err.issues[0].diagnostics


def test_every_problem_is_reported_with_its_path() -> None:
    err = fails(
        _doc(
            f.temperature(39.0, "2026-01-06T10:00:00"),
            f.temperature(39.0, NOW, unit="K"),
            f.temperature(39.0, NOW, subject="Patient/other"),
        )
    )
    assert err.status == 422
    assert [i.expression for i in err.issues] == [
        "Bundle.entry[1].resource.effectiveDateTime",
        "Bundle.entry[2].resource.valueQuantity.code",
        "Bundle.entry[3].resource.subject.reference",
    ]


@pytest.mark.parametrize(
    ("resource", "concept", "value"),
    [
        pytest.param(f.ice_score(0, NOW), "ice-score", 0.0, id="ice-0"),
        pytest.param(f.ice_score(10, NOW), "ice-score", 10.0, id="ice-10"),
        pytest.param(f.observation(f.CAPD, NOW, valueInteger=32), "capd-score", 32.0, id="capd-32"),
    ],
)
def test_score_range_edges_accepted(resource: dict[str, Any], concept: str, value: float) -> None:
    assert [s.value for s in parse(resource).series(concept)] == [value]


@pytest.mark.parametrize(
    ("entries", "ok"),
    [
        pytest.param(2, True, id="under-limit"),
        pytest.param(3, True, id="at-limit"),
        pytest.param(4, False, id="over-limit"),
    ],
)
def test_bundle_entry_limit_boundary(entries: int, ok: bool) -> None:
    temps = [f.temperature(38.0, NOW) for _ in range(entries - 1)]
    body = _doc(*temps)
    settings = Settings(max_bundle_entries=3)
    if ok:
        assert evaluate_body(body, CODEBOOK, settings, AT, RECORDED).patient_ref == f.PATIENT_REF
    else:
        assert fails(body, settings).status == 413


# --- values: BP panel components, unit conversion, rationale ------------------------------


def test_bp_panel_components_feed_systolic_and_map() -> None:
    panel = f.bp_panel(85, 62, NOW, id="bp1")
    data = parse(panel)
    (sbp,) = data.series("systolic-bp")
    (mean,) = data.series("mean-arterial-pressure")
    assert (sbp.value, sbp.ref) == (85.0, "Observation/bp1")
    assert (mean.value, mean.ref) == (62.0, "Observation/bp1")
    crs = evaluate(f.temperature(39.0, NOW), f.oxygen_device("none", NOW), panel).results[0]
    assert crs.grade == 2
    assert "Observation/bp1" in crs.basis


def test_bp_panel_with_normal_values_is_no_hypotension() -> None:
    panel = f.bp_panel(120, 80, NOW)
    crs = evaluate(f.temperature(39.0, NOW), f.oxygen_device("none", NOW), panel).results[0]
    assert crs.grade == 1


@pytest.mark.parametrize(
    ("fahrenheit", "grade"),
    [
        pytest.param(100.2, 0, id="100.2F-37.9C"),
        pytest.param(100.4, 1, id="100.4F-38.0C"),
        pytest.param(100.6, 1, id="100.6F-38.1C"),
    ],
)
def test_fahrenheit_temperature_is_converted(fahrenheit: float, grade: int) -> None:
    temp = f.temperature(fahrenheit, NOW, unit="[degF]")
    (sample,) = parse(temp).series("body-temperature")
    assert sample.value == pytest.approx((fahrenheit - 32) * 5 / 9)
    assert sample.unit == "[degF]"
    crs = evaluate(temp, *normal_vitals()).results[0]
    assert crs.grade == grade
    assert f"{fahrenheit:g} [degF] (= " in crs.rationale  # the value as sent, and converted
    assert " Cel)" in crs.rationale


def test_rationale_shows_the_converted_value() -> None:
    crs = evaluate(f.temperature(100.4, NOW, unit="[degF]"), *normal_vitals()).results[0]
    assert "100.4 [degF] (= 38 Cel)" in crs.rationale


def test_oxygen_flow_in_ml_per_min() -> None:
    flow = f.observation(f.O2_FLOW, NOW, valueQuantity=f.quantity(6100, "mL/min"))
    assert evaluate(f.temperature(39.0, NOW), f.systolic(120, NOW), flow).results[0].grade == 3


# --- day 0: CAR T infusion ---------------------------------------------------------------

AXI_CEL = {"text": "Axicabtagene ciloleucel"}


@pytest.mark.parametrize(
    "infusion",
    [
        pytest.param(f.administration(AXI_CEL, at=DAY0, status="completed"), id="administration-text"),
        pytest.param(
            f.administration({"text": "YESCARTA (axicabtagene ciloleucel) suspension"}, at=DAY0, status="completed"),
            id="administration-brand-text",
        ),
        pytest.param(
            f.administration(
                {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "71287-119-01", "display": "Kymriah"}]},
                at=DAY0,
                status="completed",
            ),
            id="administration-display",
        ),
        pytest.param(f.procedure(f.local("cart-infusion"), DAY0), id="procedure-local-code"),
    ],
)
def test_day0_from_infusion(infusion: dict[str, Any]) -> None:
    data = parse(infusion)
    day0 = data.first_event("cart-infusion")
    assert day0 is not None
    assert day0.start == datetime.fromisoformat(DAY0)
    # Masked fever through FHIR: fever on day 1, tocilizumab after it, afebrile now on a pressor.
    ev = evaluate(
        infusion,
        f.temperature(39.4, DAY1),
        f.administration("tocilizumab", at="2026-01-04T14:00:00+00:00", status="completed"),
        f.temperature(37.0, NOW),
        f.oxygen_device("none", NOW),
        f.administration("norepinephrine", start=h(6)),
    )
    crs = ev.results[0]
    assert crs.grade == 3
    assert "masked" in crs.rationale
    assert "No CAR T infusion" not in crs.rationale


def test_no_infusion_says_so() -> None:
    crs = evaluate(f.temperature(39.0, NOW), *normal_vitals()).results[0]
    assert "No CAR T infusion (day 0) found" in crs.rationale


def test_procedure_not_done_is_not_day0() -> None:
    proc = f.procedure(f.local("cart-infusion"), DAY0, status="not-done")
    data = parse(proc)
    assert data.first_event("cart-infusion") is None
    assert [(i.reason, i.concept) for i in data.ignored] == [("status not-done", "cart-infusion")]


# --- end to end ---------------------------------------------------------------------------


def test_evaluate_emits_one_assessment_per_method_with_provenance() -> None:
    ev = evaluate(f.temperature(39.0, NOW, id="fever"), *normal_vitals(), f.ice_score(8, NOW, id="ice"))
    assert [r.method for r in ev.results] == [m for m, _ in SCALES]
    assert [r.grade for r in ev.results][:2] == [1, 1]
    grades = [ra for ra in ev.assessments if ra["code"]["coding"][0]["code"] == "current-grade"]
    assert len(grades) == len(SCALES)
    assert ev.provenance["resourceType"] == "Provenance"
    assert ev.patient_ref == f.PATIENT_REF
    assert "Observation/ice" in ev.results[1].basis


def test_validate_emitted_checks_every_provenance_entity() -> None:
    """validate_emitted checks many entities of one shape as the model would (issue 12: the
    shape on the first, each reference as a FHIR string); any other shape takes the model."""
    import pydantic

    from service.fhir.emit import provenance, validate_emitted

    recorded = datetime(2026, 1, 6, tzinfo=UTC)
    prov = provenance([{"id": "a"}], [f"Observation/o{i}" for i in range(50)], "https://iectox.org/fhir", recorded)
    validate_emitted([prov])
    for bad in (
        {"role": "source", "what": {"reference": ""}},  # an empty string is no FHIR string
        {"role": "source", "what": {"reference": 5}},
        {"role": "source", "what": {"reference": "Observation/x"}, "extra": 1},
    ):
        broken = {**prov, "entity": [*prov["entity"][:10], bad, *prov["entity"][10:]]}
        with pytest.raises(pydantic.ValidationError):
            validate_emitted([broken])
