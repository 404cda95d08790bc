"""Risk scores end to end: small FHIR bundles through `evaluate_body`, values computed by hand.

EASIX (Luft 2017) and EASIX-pre with the Korell 2022 cut-off (> 4.67), m-EASIX and s-EASIX at
the Pennisi 2021 time points, the product baseline (seed 003 Table 1) and disease burden
(seed 001 Table 2). Every number checked here is quoted in docs/score-sources.md. Every
hand computation is written out next to its case.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from service.app.evaluate import Evaluation, evaluate_body
from service.codebook import load_codebook
from service.config.settings import Settings
from service.core.model import Administration, PatientData, Sample
from service.core.scores import (
    EASIX_PRE_CUTOFF,
    PRODUCT_RATES,
    ScoreConfig,
    ScoreResult,
    all_scores,
    disease_burden,
    easix_scores,
    product_baseline,
)
from service.fhir.errors import FhirError
from tests import factories as f
from tests.fhir_validators import assert_valid_fhir, assert_valid_r4b

SETTINGS = Settings()
CODEBOOK = load_codebook(SETTINGS.canonical_base)
RECORDED = datetime(2026, 2, 1, tzinfo=UTC)
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SCORE_URL = f"{f.BASE}/StructureDefinition/score"
OUTCOME_SYSTEM = f"{f.BASE}/CodeSystem/outcome"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"

# The timeline of every case: lymphodepletion starts LD, the CAR T cells go in at DAY0.
LD = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
DAY0 = datetime(2026, 1, 6, 10, 0, tzinfo=UTC)
AT = datetime(2026, 1, 12, 0, 0, tzinfo=UTC)  # after day +3 (2026-01-09T10:00), so every point is due

LAB_LOINC = {
    "ldh": "2532-0",
    "ldh-alt": "14804-9",  # the other LDH code of the codebook
    "creatinine": "2160-0",  # mass/volume (mg/dL)
    "creatinine-molar": "14682-9",  # moles/volume (umol/L)
    "platelets": "777-3",
    "crp": "1988-5",
}
DEFAULT_UNIT = {"ldh": "U/L", "creatinine": "mg/dL", "platelets": "10*9/L", "crp": "mg/dL"}


# --- builders ------------------------------------------------------------------------------


def iso(t: datetime) -> str:
    return t.isoformat()


def hours(t: datetime, h: float) -> datetime:
    return t + timedelta(hours=h)


def lab(concept: str, value: float, when: datetime, unit: str | None = None, **extra: Any) -> dict[str, Any]:
    """A lab Observation; `concept` is a LAB_LOINC key, the unit defaults to the canonical one."""
    unit = unit or DEFAULT_UNIT[concept.split("-")[0]]
    return f.observation((f.LOINC, LAB_LOINC[concept]), iso(when), valueQuantity=f.quantity(value, unit), **extra)


def easix_labs(ldh: float, creatinine: float, platelets: float, when: datetime, prefix: str = "") -> list[dict]:
    return [
        lab("ldh", ldh, when, id=f"{prefix}ldh"),
        lab("creatinine", creatinine, when, id=f"{prefix}crea"),
        lab("platelets", platelets, when, id=f"{prefix}plt"),
    ]


def lymphodepletion(when: datetime = LD) -> dict[str, Any]:
    # RxNorm 3002 cyclophosphamide: the codebook's lymphodepletion concept.
    return f.administration(f.cc(f.RXNORM, "3002"), at=iso(when), status="completed", id="ld")


def infusion(text: str | None = "axicabtagene ciloleucel", when: datetime = DAY0) -> dict[str, Any]:
    """A CAR T infusion: the local cart-infusion code, the product named in the text (or not)."""
    return f.administration(f.cc(f.LOCAL, "cart-infusion", text), at=iso(when), status="completed", id="cart")


def condition(code: str, cid: str = "dx") -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f.PATIENT_REF},
        "code": {"coding": [{"system": ICD10CM, "code": code}]},
    }


def blasts(pct: float, when: datetime, **extra: Any) -> dict[str, Any]:
    return f.observation((f.LOCAL, "bm-blasts"), iso(when), valueQuantity=f.quantity(pct, "%"), **extra)


def extramedullary(value: str, when: datetime, **extra: Any) -> dict[str, Any]:
    return f.observation(
        (f.LOCAL, "extramedullary-disease"),
        iso(when),
        valueCodeableConcept=f.local(f"extramedullary-disease.{value}"),
        **extra,
    )


def evaluate(*resources: dict[str, Any], at: datetime = AT, settings: Settings = SETTINGS) -> Evaluation:
    ev = evaluate_body(f.body(f.patient(), *resources), CODEBOOK, settings, at, RECORDED)
    ids = [ra["id"] for ra in ev.assessments]
    assert len(ids) == len(set(ids)), "every emitted RiskAssessment needs its own id"
    return ev


def fails(*resources: dict[str, Any]) -> FhirError:
    """Strict handling (`Prefer: handling=strict`): bad input is a 422 with every FHIRPath."""
    with pytest.raises(FhirError) as err:
        evaluate_body(f.body(f.patient(), *resources), CODEBOOK, SETTINGS, AT, RECORDED, strict=True)
    return err.value


# --- readers -------------------------------------------------------------------------------


def results(ev: Evaluation, method: str) -> dict[str, ScoreResult]:
    """The ScoreResults of one method, by time-point label."""
    return {s.label: s for s in ev.scores if s.method == method}


def score_ras(ev: Evaluation) -> list[dict[str, Any]]:
    return [ra for ra in ev.assessments if ra["code"]["coding"][0]["code"] == "risk-score"]


def ra_for(ev: Evaluation, method: str, label: str) -> dict[str, Any]:
    """The emitted RiskAssessment of one score at one time point (code.text 'method at label')."""
    found = [ra for ra in score_ras(ev) if ra["code"]["text"] == f"{method} at {label}"]
    assert len(found) == 1, [ra["code"]["text"] for ra in score_ras(ev)]
    return found[0]


def score_value(ra: dict[str, Any]) -> float | None:
    ext = [e for e in ra.get("extension", ()) if e["url"].endswith("/StructureDefinition/score")]
    assert len(ext) <= 1
    return ext[0]["valueDecimal"] if ext else None


def qualitative(ra: dict[str, Any]) -> str | None:
    qr = ra["prediction"][0].get("qualitativeRisk")
    if qr is None:
        return None
    coding = qr["coding"][0]
    assert coding["system"] == RISK_PROBABILITY
    return str(coding["code"])


def outcome(ra: dict[str, Any], i: int = 0) -> str:
    coding = ra["prediction"][i]["outcome"]["coding"][0]
    assert coding["system"] == OUTCOME_SYSTEM
    return str(coding["code"])


# --- 1. EASIX: hand computation, units, the Korell cut-off -------------------------------------


@pytest.mark.parametrize(
    ("creatinine", "expected"),
    [
        # 250 U/L x 1.2 mg/dL / 150 10^9/L = 300 / 150 = 2.0
        pytest.param(lab("creatinine", 1.2, hours(LD, -2), id="crea"), 2.0, id="creatinine-mg-dL"),
        # 106.08 umol/L / 88.4 = 1.2 mg/dL -> 250 x 1.2 / 150 = 2.0
        pytest.param(
            lab("creatinine-molar", 106.08, hours(LD, -2), unit="umol/L", id="crea"), 2.0, id="creatinine-umol-L"
        ),
    ],
)
def test_easix_pre_hand_computed(creatinine: dict[str, Any], expected: float) -> None:
    ev = evaluate(
        lymphodepletion(),
        lab("ldh", 250, hours(LD, -2), id="ldh"),
        creatinine,
        lab("platelets", 150, hours(LD, -2), id="plt"),
    )
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.value == pytest.approx(expected, abs=1e-6)
    assert pre.at == LD  # occurrenceDateTime: the start of lymphodepletion
    ra = ra_for(ev, "easix", "pre-lymphodepletion")
    assert score_value(ra) == pytest.approx(expected, abs=1e-6)
    assert ra["occurrenceDateTime"] == iso(LD)
    assert {b["reference"] for b in ra["basis"]} == {"Observation/ldh", "Observation/crea", "Observation/plt"}
    # 2.0 is not above 4.67: low.
    assert outcome(ra) == "severe-crs-or-icans"
    assert qualitative(ra) == "low"
    assert "probabilityDecimal" not in ra["prediction"][0]


@pytest.mark.parametrize(
    ("ldh", "creatinine", "platelets", "value", "risk"),
    [
        # 466 x 1.0 / 100 = 4.66: below the cut-off
        pytest.param(466, 1.0, 100, 4.66, "low", id="4.66-low"),
        # 467 x 1.0 / 100 = 4.67: equal to the cut-off, and Korell's rule is strictly "> 4.67"
        pytest.param(467, 1.0, 100, 4.67, "low", id="4.67-exactly-low"),
        # 233.5 x 2.0 / 100 = 467 / 100 = 4.67: the same value from other inputs
        pytest.param(233.5, 2.0, 100, 4.67, "low", id="4.67-other-inputs-low"),
        # 468 x 1.0 / 100 = 4.68: just above
        pytest.param(468, 1.0, 100, 4.68, "high", id="4.68-high"),
        # 1000 x 1.5 / 50 = 30.0: far above
        pytest.param(1000, 1.5, 50, 30.0, "high", id="30-high"),
    ],
)
def test_easix_pre_korell_cutoff(ldh: float, creatinine: float, platelets: float, value: float, risk: str) -> None:
    ev = evaluate(lymphodepletion(), *easix_labs(ldh, creatinine, platelets, hours(LD, -3)))
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.value == value  # exact in binary floating point for these inputs
    ra = ra_for(ev, "easix", "pre-lymphodepletion")
    assert score_value(ra) == value
    assert qualitative(ra) == risk
    rationale = ra["prediction"][0]["rationale"]
    assert "Korell 2022" in rationale and "4.67" in rationale and "OR 4.3" in rationale
    assert ("is above the cut-off: high risk" in rationale) == (risk == "high")
    assert ("is not above the cut-off: low risk" in rationale) == (risk == "low")


def test_cutoff_constant_is_korell() -> None:
    assert EASIX_PRE_CUTOFF == 4.67


def test_easix_at_later_ldh_time_points_has_no_category() -> None:
    t1, t2 = hours(DAY0, 20), hours(DAY0, 44)
    ev = evaluate(
        lymphodepletion(),
        infusion(),
        *easix_labs(250, 1.2, 150, hours(LD, -2), prefix="pre-"),
        # 400 x 1.5 / 100 = 6.0 (above 4.67, yet no category outside the pre-LD point)
        *easix_labs(400, 1.5, 100, t1, prefix="d1-"),
        # 500 x 2.0 / 50 = 20.0
        *easix_labs(500, 2.0, 50, t2, prefix="d2-"),
    )
    easix = results(ev, "easix")
    assert set(easix) == {"pre-lymphodepletion", t1.isoformat(timespec="minutes"), t2.isoformat(timespec="minutes")}
    for t, value in ((t1, 6.0), (t2, 20.0)):
        label = t.isoformat(timespec="minutes")
        assert easix[label].value == pytest.approx(value)
        ra = ra_for(ev, "easix", label)
        assert score_value(ra) == pytest.approx(value)
        assert qualitative(ra) is None
        assert "no category" in ra["prediction"][0]["rationale"]
    assert qualitative(ra_for(ev, "easix", "pre-lymphodepletion")) == "low"  # 2.0


def full_resources(indication: str = "C91.00", product: str = "Kymriah") -> list[dict[str, Any]]:
    """Every score computable: labs at every time point, product, indication, marrow status."""
    return [
        lymphodepletion(),
        infusion(product),
        condition(indication),
        *easix_labs(467, 1.0, 100, hours(LD, -2), prefix="pre-"),
        lab("crp", 50, hours(LD, -2), unit="mg/L", id="pre-crp"),
        *easix_labs(300, 1.0, 100, hours(DAY0, -24), prefix="dm1-"),
        lab("crp", 2, hours(DAY0, -24), id="dm1-crp"),
        *easix_labs(300, 1.0, 100, hours(DAY0, 24), prefix="d1-"),
        lab("crp", 5, hours(DAY0, 24), id="d1-crp"),
        *easix_labs(300, 1.0, 100, hours(DAY0, 72), prefix="d3-"),
        lab("crp", 9, hours(DAY0, 72), id="d3-crp"),
        blasts(12, hours(LD, -24), id="bm"),
        extramedullary("absent", hours(LD, -24), id="emd"),
    ]


def test_qualitative_risk_only_on_easix_pre() -> None:
    ev = evaluate(*full_resources())
    ras = score_ras(ev)
    methods = {ra["method"]["coding"][0]["code"] for ra in ras}
    assert methods == {"easix", "m-easix", "s-easix", "product-baseline", "disease-burden"}
    with_risk = [ra["code"]["text"] for ra in ras if any("qualitativeRisk" in p for p in ra["prediction"])]
    assert with_risk == ["easix at pre-lymphodepletion"]
    assert not [s for s in ev.scores if s.indeterminate]  # every score computed in this bundle


# --- 2. m-EASIX and s-EASIX at the Pennisi time points ------------------------------------------

# (label, time of the labs, LDH U/L, CRP as sent, CRP unit, platelets 10^9/L, m-EASIX, s-EASIX)
PENNISI_CASES = [
    # LD: 300 x (50 mg/L = 5 mg/dL) / 100 = 15.0 (not 150: CRP must be in mg/dL); s = 300 / 100 = 3.0
    ("lymphodepletion", hours(LD, -2), 300, 50, "mg/L", 100, 15.0, 3.0),
    # day -1: 400 x 2 mg/dL / 80 = 10.0; s = 400 / 80 = 5.0
    ("day -1", hours(DAY0, -24 + 3), 400, 2, "mg/dL", 80, 10.0, 5.0),
    # day +1: 250 x (100 mg/L = 10 mg/dL) / 50 = 50.0; s = 250 / 50 = 5.0
    ("day +1", hours(DAY0, 24 + 3), 250, 100, "mg/L", 50, 50.0, 5.0),
    # day +3: 600 x 8 mg/dL / 40 = 120.0; s = 600 / 40 = 15.0
    ("day +3", hours(DAY0, 72 - 2), 600, 8, "mg/dL", 40, 120.0, 15.0),
]
PENNISI_AUC = {"lymphodepletion": "80.4%", "day -1": "73.0%", "day +1": "75.4%"}


def pennisi_resources() -> list[dict[str, Any]]:
    out = [lymphodepletion(), infusion()]
    for i, (_, t, ldh, crp, crp_unit, plt, _, _) in enumerate(PENNISI_CASES):
        out += [
            lab("ldh", ldh, t, id=f"p{i}-ldh"),
            lab("crp", crp, t, unit=crp_unit, id=f"p{i}-crp"),
            lab("platelets", plt, t, id=f"p{i}-plt"),
        ]
    return out


@pytest.mark.parametrize(
    ("label", "m_easix", "s_easix"), [pytest.param(c[0], c[6], c[7], id=c[0]) for c in PENNISI_CASES]
)
def test_m_and_s_easix_hand_computed(label: str, m_easix: float, s_easix: float) -> None:
    ev = evaluate(*pennisi_resources())
    for method, expected in (("m-easix", m_easix), ("s-easix", s_easix)):
        result = results(ev, method)[label]
        assert result.value == pytest.approx(expected), (method, label)
        ra = ra_for(ev, method, label)
        assert score_value(ra) == pytest.approx(expected)
        assert qualitative(ra) is None  # no verified m-EASIX / s-EASIX cut-off
        # Pennisi 2021: severe CRS at each point; at day +3 also severe ICANS.
        assert outcome(ra) == ("severe-crs-or-icans" if label == "day +3" else "severe-crs")
        rationale = ra["prediction"][0]["rationale"]
        assert "Pennisi 2021" in rationale and "no risk category" in rationale
        if label in PENNISI_AUC:
            assert f"AUC for severe CRS at {label}: {PENNISI_AUC[label]}" in rationale
        else:  # day +3: discriminated severe ICANS, AUC value not verified
            assert "AUC not verified" in rationale
    # The time points: LD from the pre-LD window (target = LD start), the others day 0 + n days.
    targets = {s.label: s.at for s in ev.scores if s.method == "m-easix"}
    assert targets == {
        "lymphodepletion": LD,
        "day -1": DAY0 - timedelta(days=1),
        "day +1": DAY0 + timedelta(days=1),
        "day +3": DAY0 + timedelta(days=3),
    }


def test_m_easix_crp_mg_per_l_is_converted_not_taken_as_mg_per_dl() -> None:
    ev = evaluate(*pennisi_resources())
    m = results(ev, "m-easix")["lymphodepletion"]
    assert m.value == pytest.approx(15.0)  # 300 x 5 / 100
    assert m.value != pytest.approx(150.0)  # 300 x 50 / 100: CRP left in mg/L
    assert "50 mg/L (= 5 mg/dL)" in m.predictions[0].rationale


@pytest.mark.parametrize(
    ("offsets", "expected"),
    [
        # LDH at day +1 -3 h (300) and +6 h (600): the nearest (-3 h) is used: s = 300 / 100 = 3.0
        pytest.param((-3, 6), 3.0, id="nearest-before"),
        # -10 h (300) and +2 h (600): +2 h is nearer: s = 600 / 100 = 6.0
        pytest.param((-10, 2), 6.0, id="nearest-after"),
        # -24 h (300) exactly on the edge of the window and +30 h (600) outside: 300 / 100 = 3.0
        pytest.param((-24, 30), 3.0, id="edge-24h-inclusive"),
        # -25 h and +25 h: both outside +/- 24 h: indeterminate (ldh missing)
        pytest.param((-25, 25), None, id="both-outside"),
    ],
)
def test_time_point_takes_the_nearest_value_within_24h(offsets: tuple[float, float], expected: float | None) -> None:
    target = DAY0 + timedelta(days=1)
    ev = evaluate(
        infusion(),
        lab("ldh", 300, hours(target, offsets[0]), id="ldh-a"),
        lab("ldh", 600, hours(target, offsets[1]), id="ldh-b"),
        lab("platelets", 100, target, id="plt"),
    )
    result = results(ev, "s-easix")["day +1"]
    if expected is None:
        assert result.missing == ("ldh",)
        assert score_value(ra_for(ev, "s-easix", "day +1")) is None
    else:
        assert result.value == pytest.approx(expected)


def test_time_point_never_uses_a_value_after_at() -> None:
    target = DAY0 + timedelta(days=1)
    at = hours(target, 0.5)
    ev = evaluate(
        infusion(),
        # -10 h: 300 / 100 = 3.0 (used); +1 h is nearer but after `at`: 900 / 100 = 9.0 (never used)
        lab("ldh", 300, hours(target, -10), id="ldh-early"),
        lab("ldh", 900, hours(target, 1), id="ldh-after-at"),
        lab("platelets", 100, hours(target, -10), id="plt"),
        at=at,
    )
    day1 = results(ev, "s-easix")["day +1"]
    assert day1.value == pytest.approx(3.0)
    assert "Observation/ldh-after-at" not in day1.basis
    assert all("Observation/ldh-after-at" not in s.basis for s in ev.scores)
    # The same lab, once `at` has passed it, is nearer and used: 900 / 100 = 9.0.
    later = evaluate(
        infusion(),
        lab("ldh", 300, hours(target, -10), id="ldh-early"),
        lab("ldh", 900, hours(target, 1), id="ldh-after-at"),
        lab("platelets", 100, hours(target, -10), id="plt"),
        at=hours(target, 2),
    )
    assert results(later, "s-easix")["day +1"].value == pytest.approx(9.0)


@pytest.mark.parametrize(
    ("at", "labels"),
    [
        # before LD: no time point is due yet
        pytest.param(hours(LD, -1), set(), id="before-ld"),
        # after LD, before day -1 (2026-01-05T10:00)
        pytest.param(hours(LD, 1), {"lymphodepletion"}, id="after-ld"),
        # day -1 itself is due (target <= at)
        pytest.param(DAY0 - timedelta(days=1), {"lymphodepletion", "day -1"}, id="at-day-1"),
        # between day +1 and day +3
        pytest.param(hours(DAY0, 30), {"lymphodepletion", "day -1", "day +1"}, id="before-day-3"),
        pytest.param(AT, {"lymphodepletion", "day -1", "day +1", "day +3"}, id="all"),
    ],
)
def test_future_time_points_are_not_reported(at: datetime, labels: set[str]) -> None:
    ev = evaluate(*pennisi_resources(), at=at)
    for method in ("m-easix", "s-easix"):
        assert set(results(ev, method)) == labels
    assert {ra["code"]["text"] for ra in score_ras(ev) if ra["method"]["coding"][0]["code"] == "m-easix"} == {
        f"m-easix at {label}" for label in labels
    }


def test_no_infusion_gives_one_indeterminate_for_the_infusion_points() -> None:
    ev = evaluate(lymphodepletion(), *easix_labs(300, 1.0, 100, hours(LD, -2)), lab("crp", 5, hours(LD, -2)))
    for method in ("m-easix", "s-easix"):
        got = results(ev, method)
        assert set(got) == {"lymphodepletion", "day -1, +1 and +3"}
        assert got["day -1, +1 and +3"].missing == ("cart-infusion",)
        assert not got["lymphodepletion"].indeterminate
    # m = 300 x 5 / 100 = 15.0; s = 300 / 100 = 3.0
    assert results(ev, "m-easix")["lymphodepletion"].value == pytest.approx(15.0)
    assert results(ev, "s-easix")["lymphodepletion"].value == pytest.approx(3.0)


# --- 3. Which lab counts as "pre-lymphodepletion" ----------------------------------------------


def test_labs_only_after_ld_start_leave_easix_pre_indeterminate() -> None:
    ev = evaluate(lymphodepletion(), *easix_labs(250, 1.2, 150, hours(LD, 1)))
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.indeterminate and pre.value is None
    assert pre.missing == ("ldh", "creatinine", "platelets")
    ra = ra_for(ev, "easix", "pre-lymphodepletion")
    assert outcome(ra) == "indeterminate"
    assert "ldh, creatinine, platelets" in ra["prediction"][0]["outcome"]["text"]
    assert "no ldh, creatinine, platelets" in ra["prediction"][0]["rationale"]
    assert score_value(ra) is None and qualitative(ra) is None
    # The labs after LD are an ordinary EASIX time point instead: 250 x 1.2 / 150 = 2.0, no category.
    after = results(ev, "easix")[hours(LD, 1).isoformat(timespec="minutes")]
    assert after.value == pytest.approx(2.0)
    assert after.predictions[0].qualitative is None


def test_lab_at_ld_start_is_not_pre() -> None:
    ev = evaluate(lymphodepletion(), *easix_labs(250, 1.2, 150, LD))
    assert results(ev, "easix")["pre-lymphodepletion"].missing == ("ldh", "creatinine", "platelets")


def test_the_lab_before_ld_is_used_not_the_one_after() -> None:
    ev = evaluate(
        lymphodepletion(),
        # 2 h before LD: 250 x 1.2 / 150 = 2.0 (low)
        *easix_labs(250, 1.2, 150, hours(LD, -2), prefix="before-"),
        # 1 h after LD: 500 x 2.0 / 100 = 10.0 (would be high): not "pre"
        *easix_labs(500, 2.0, 100, hours(LD, 1), prefix="after-"),
    )
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.value == pytest.approx(2.0)
    assert pre.predictions[0].qualitative == "low"
    assert set(pre.basis) == {"Observation/before-ldh", "Observation/before-crea", "Observation/before-plt"}


def test_the_latest_lab_before_ld_is_used() -> None:
    ev = evaluate(
        lymphodepletion(),
        # 48 h before: 1000 x 1.0 / 100 = 10.0; 6 h before: 250 x 1.2 / 150 = 2.0 (the latest wins)
        *easix_labs(1000, 1.0, 100, hours(LD, -48), prefix="old-"),
        *easix_labs(250, 1.2, 150, hours(LD, -6), prefix="new-"),
    )
    assert results(ev, "easix")["pre-lymphodepletion"].value == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("hours_before", "used"),
    [
        pytest.param(1, True, id="1h"),
        pytest.param(71, True, id="71h"),
        pytest.param(72, True, id="72h-edge-inclusive"),
        pytest.param(73, False, id="73h"),
        pytest.param(80, False, id="80h"),
    ],
)
def test_pre_ld_lookback_is_72h(hours_before: float, used: bool) -> None:
    ev = evaluate(lymphodepletion(), *easix_labs(250, 1.2, 150, hours(LD, -hours_before)))
    pre = results(ev, "easix")["pre-lymphodepletion"]
    if used:
        assert pre.value == pytest.approx(2.0)  # 250 x 1.2 / 150
    else:
        assert pre.missing == ("ldh", "creatinine", "platelets")
        # the old labs are not reported as an EASIX time point either
        assert set(results(ev, "easix")) == {"pre-lymphodepletion"}


def test_pre_ld_lookback_follows_settings() -> None:
    settings = Settings(pre_lymphodepletion_lookback_hours=96)
    ev = evaluate(lymphodepletion(), *easix_labs(250, 1.2, 150, hours(LD, -80)), settings=settings)
    assert results(ev, "easix")["pre-lymphodepletion"].value == pytest.approx(2.0)


def test_no_score_uses_a_lab_after_at() -> None:
    at = hours(LD, -1)  # evaluated before lymphodepletion has started
    ev = evaluate(
        lymphodepletion(),
        # 10 h before `at`: 250 x 1.2 / 150 = 2.0
        *easix_labs(250, 1.2, 150, hours(at, -10), prefix="old-"),
        # 30 min after `at` (still before LD): never used
        *easix_labs(900, 3.0, 30, hours(at, 0.5), prefix="late-"),
        at=at,
    )
    # LD is in the future: no pre-LD point yet; the earlier LDH is an ordinary EASIX time point.
    easix = results(ev, "easix")
    assert set(easix) == {hours(at, -10).isoformat(timespec="minutes")}
    assert next(iter(easix.values())).value == pytest.approx(2.0)
    late = {"Observation/late-ldh", "Observation/late-crea", "Observation/late-plt"}
    assert not late & {ref for s in ev.scores for ref in s.basis}


@pytest.mark.parametrize(
    "offset",
    [pytest.param(UTC, id="same-offset"), pytest.param(timezone(timedelta(hours=2)), id="other-offset")],
)
def test_same_instant_ldh_twice_gives_one_time_point(offset: timezone) -> None:
    # Both LDH codes of the codebook drawn at the same instant (one sample, two results): one EASIX
    # time point, not two RiskAssessments with the same id (the Bundle would break bdl-7), nor two
    # assessments of one instant written with different UTC offsets.
    t = hours(DAY0, 24)
    ev = evaluate(
        lab("ldh", 300, t, id="ldh-a"),
        lab("ldh-alt", 300, t.astimezone(offset), id="ldh-b"),
        lab("creatinine", 1.0, t, id="crea"),
        lab("platelets", 100, t, id="plt"),
    )
    points = [s for s in ev.scores if s.method == "easix" and not s.indeterminate]
    assert len(points) == 1
    assert points[0].value == pytest.approx(3.0)  # 300 x 1.0 / 100
    assert_valid_r4b([ev.bundle()])


# --- 4. Missing inputs and unusable units ------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        pytest.param({"ldh"}, ("ldh",), id="no-ldh"),
        pytest.param({"crea"}, ("creatinine",), id="no-creatinine"),
        pytest.param({"plt"}, ("platelets",), id="no-platelets"),
        pytest.param({"ldh", "crea", "plt"}, ("ldh", "creatinine", "platelets"), id="no-labs"),
    ],
)
def test_missing_lab_is_indeterminate(drop: set[str], missing: tuple[str, ...]) -> None:
    labs = [r for r in easix_labs(250, 1.2, 150, hours(LD, -2)) if r["id"] not in drop]
    ev = evaluate(lymphodepletion(), *labs)
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.missing == missing and pre.value is None
    ra = ra_for(ev, "easix", "pre-lymphodepletion")
    assert outcome(ra) == "indeterminate"
    assert "extension" not in ra
    assert qualitative(ra) is None
    assert ra["prediction"][0]["outcome"]["text"].endswith(f"missing {', '.join(missing)}")


def test_no_lymphodepletion_is_indeterminate() -> None:
    ev = evaluate(*easix_labs(250, 1.2, 150, hours(LD, -2)))
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.missing == ("lymphodepletion",)
    assert "no lymphodepletion recorded" in pre.predictions[0].rationale
    m = results(ev, "m-easix")["lymphodepletion"]
    assert m.missing == ("lymphodepletion",)
    assert "extension" not in ra_for(ev, "easix", "pre-lymphodepletion")


def test_zero_platelets_is_indeterminate_not_a_division_by_zero() -> None:
    ev = evaluate(lymphodepletion(), *easix_labs(250, 1.2, 0, hours(LD, -2)))
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.missing == ("platelets (non-zero)",)
    assert "extension" not in ra_for(ev, "easix", "pre-lymphodepletion")


@pytest.mark.parametrize(
    ("resource", "index"),
    [
        pytest.param(lab("creatinine", 0.1, hours(LD, -2), unit="mmol/L"), 2, id="creatinine-mmol-L"),
        pytest.param(lab("ldh", 4.2, hours(LD, -2), unit="ukat/L"), 2, id="ldh-ukat-L"),
        pytest.param(lab("crp", 5, hours(LD, -2), unit="g/L"), 2, id="crp-g-L"),
        pytest.param(lab("platelets", 150, hours(LD, -2), unit="g/L"), 2, id="platelets-g-L"),
    ],
)
def test_unconvertible_unit_is_422_with_path(resource: dict[str, Any], index: int) -> None:
    # entry 0 is the Patient, entry 1 lymphodepletion, entry 2 the lab
    err = fails(lymphodepletion(), resource)
    assert err.status == 422
    assert [i.expression for i in err.issues] == [f"Bundle.entry[{index}].resource.valueQuantity.code"]
    assert "is not accepted" in err.issues[0].diagnostics


# --- 5. Product baseline (seed 003 Table 1) ----------------------------------------------------


@pytest.mark.parametrize(
    ("infused", "dx", "crs", "neuro", "population"),
    [
        pytest.param(infusion("axicabtagene ciloleucel"), "C83.38", 0.93, 0.64, "LBCL", id="axi-cel-lbcl-ma"),
        pytest.param(
            f.procedure(f.cc(f.LOCAL, "cart-infusion", "Yescarta"), iso(DAY0), id="cart"),
            "C83.38",
            0.93,
            0.64,
            "LBCL",
            id="axi-cel-lbcl-procedure",
        ),
        pytest.param(infusion("Kymriah"), "C91.00", 0.77, 0.39, "pediatric/young adult B-ALL", id="tisa-cel-all"),
        pytest.param(infusion("Kymriah"), "C83.30", 0.57, 0.20, "LBCL", id="tisa-cel-lbcl"),
        pytest.param(infusion("Tecartus"), "C91.02", 0.89, 0.60, "adult B-ALL", id="brexu-cel-all"),
        pytest.param(infusion("Breyanzi"), "C91.10", 0.85, 0.45, "CLL", id="liso-cel-cll"),
        pytest.param(infusion("Carvykti"), "C90.00", 0.95, 0.22, "MM", id="cilta-cel-mm"),
    ],
)
def test_product_baseline_rates(infused: dict[str, Any], dx: str, crs: float, neuro: float, population: str) -> None:
    ev = evaluate(infused, condition(dx))
    (result,) = results(ev, "product-baseline").values()
    assert not result.indeterminate and result.value is None
    assert set(result.basis) == {
        "Procedure/cart" if infused["resourceType"] == "Procedure" else "MedicationAdministration/cart",
        "Condition/dx",
    }
    ra = ra_for(ev, "product-baseline", "infusion")
    assert ra["occurrenceDateTime"] == iso(DAY0)
    assert [outcome(ra, i) for i in range(2)] == ["crs-any-grade", "neurotoxicity-any-grade"]
    probs = [p["probabilityDecimal"] for p in ra["prediction"]]
    assert probs == [crs, neuro]
    assert all(0 < p < 1 for p in probs)  # fractions, never percentages
    assert "extension" not in ra and all("qualitativeRisk" not in p for p in ra["prediction"])
    for p in ra["prediction"]:
        assert f"for {population}:" in p["rationale"]
        assert "population rate, not an individual prediction" in p["rationale"]
    assert f"Any-grade CRS {round(crs * 100)}%" in ra["prediction"][0]["rationale"]


@pytest.mark.parametrize(
    ("resources", "missing", "reason"),
    [
        pytest.param(
            [infusion(None), condition("C83.38")],
            ("cart-infusion product",),
            "infused product not identified",
            id="unknown-product",
        ),
        pytest.param([condition("C83.38")], ("cart-infusion product",), "no CAR T infusion recorded", id="no-infusion"),
        pytest.param(
            [infusion("Yescarta")],
            ("indication",),
            "no Condition mapped to an indication in the codebook",
            id="no-condition",
        ),
        pytest.param(
            [infusion("Yescarta"), condition("C83.38", "dx1"), condition("C91.00", "dx2")],
            ("indication",),
            "several indications recorded (b-all, lbcl)",
            id="two-indications",
        ),
        pytest.param(
            # axi-cel has no pivotal-trial row in MCL (seed 003 Table 1)
            [infusion("Yescarta"), condition("C83.10")],
            ("product-indication pair",),
            "no pivotal-trial rate for axicabtagene-ciloleucel in mcl",
            id="no-trial-row",
        ),
        pytest.param(
            [infusion(None), condition("C83.38", "dx1"), condition("C82.90", "dx2")],
            ("cart-infusion product", "indication"),
            "infused product not identified; several indications recorded (fl, lbcl)",
            id="both-missing",
        ),
    ],
)
def test_product_baseline_indeterminate(resources: list[dict[str, Any]], missing: tuple[str, ...], reason: str) -> None:
    ev = evaluate(*resources)
    (result,) = results(ev, "product-baseline").values()
    assert result.missing == missing
    ra = ra_for(ev, "product-baseline", "infusion")
    assert [outcome(ra, i) for i in range(2)] == ["indeterminate", "indeterminate"]
    for p in ra["prediction"]:
        assert "probabilityDecimal" not in p
        assert reason in p["rationale"]


def test_same_indication_twice_is_one_indication() -> None:
    # C83.38 and C83.30 are both DLBCL (C83.3): one indication, axi-cel LBCL rates.
    ev = evaluate(infusion("axi-cel"), condition("C83.38", "dx1"), condition("C83.30", "dx2"))
    ra = ra_for(ev, "product-baseline", "infusion")
    assert [p["probabilityDecimal"] for p in ra["prediction"]] == [0.93, 0.64]


def test_refuted_condition_is_not_an_indication() -> None:
    refuted = condition("C91.00", "dx2")
    refuted["verificationStatus"] = f.cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "refuted")
    ev = evaluate(infusion("axi-cel"), condition("C83.38", "dx1"), refuted)
    ra = ra_for(ev, "product-baseline", "infusion")
    assert [p["probabilityDecimal"] for p in ra["prediction"]] == [0.93, 0.64]


def test_infusion_after_at_gives_no_product_baseline() -> None:
    ev = evaluate(infusion("axi-cel"), condition("C83.38"), at=hours(DAY0, -1))
    assert results(ev, "product-baseline") == {}


def test_every_product_rate_is_a_fraction() -> None:
    # Pure function over every Table 1 row: probabilities are fractions 0-1, rationale in %.
    t = DAY0
    for row in PRODUCT_RATES:
        data = PatientData(
            f.PATIENT_REF,
            administrations={"cart-infusion": [Administration("cart-infusion", t, t, "X/cart", product=row.product)]},
            indications=[(row.indication, "Condition/dx")],
        )
        (result,) = product_baseline(data, AT)
        probs = [p.probability for p in result.predictions]
        assert probs == [row.crs, row.neuro]
        assert all(p is not None and 0 < p < 1 for p in probs)
        assert f"Any-grade CRS {row.crs:.0%}" in result.predictions[0].rationale


# --- 6. Disease burden (seed 001, B-ALL only) --------------------------------------------------


@pytest.mark.parametrize(
    ("marrow", "rr", "basis"),
    [
        # blasts 12% >= 5%: morphologic disease, HR 2.20 against MRD-only
        pytest.param([blasts(12, hours(LD, -24), id="bm")], 2.2, {"Observation/bm"}, id="blasts-12"),
        # blasts 3% < 5% and no extramedullary disease: MRD-only, the reference group (1.0)
        pytest.param(
            [blasts(3, hours(LD, -24), id="bm"), extramedullary("absent", hours(LD, -24), id="emd")],
            1.0,
            {"Observation/bm", "Observation/emd"},
            id="blasts-3-emd-absent",
        ),
        # 4.9% is below the >= 5% line
        pytest.param(
            [blasts(4.9, hours(LD, -24), id="bm"), extramedullary("absent", hours(LD, -24), id="emd")],
            1.0,
            {"Observation/bm", "Observation/emd"},
            id="blasts-4.9",
        ),
        # exactly 5.0% is morphologic (>= 5)
        pytest.param(
            [blasts(5.0, hours(LD, -24), id="bm"), extramedullary("absent", hours(LD, -24), id="emd")],
            2.2,
            {"Observation/bm", "Observation/emd"},
            id="blasts-5.0",
        ),
        # extramedullary disease present makes it morphologic even with 1% blasts
        pytest.param(
            [blasts(1, hours(LD, -24), id="bm"), extramedullary("present", hours(LD, -24), id="emd")],
            2.2,
            {"Observation/bm", "Observation/emd"},
            id="emd-present-blasts-1",
        ),
        # the latest marrow before LD counts: 12% a month ago, 2% two days before LD
        pytest.param(
            [
                blasts(12, hours(LD, -24 * 30), id="bm-old"),
                blasts(2, hours(LD, -48), id="bm"),
                extramedullary("absent", hours(LD, -48), id="emd"),
            ],
            1.0,
            {"Observation/bm", "Observation/emd"},
            id="latest-before-ld",
        ),
    ],
)
def test_disease_burden_b_all(marrow: list[dict[str, Any]], rr: float, basis: set[str]) -> None:
    ev = evaluate(lymphodepletion(), infusion("Kymriah"), condition("C91.00"), *marrow)
    (result,) = results(ev, "disease-burden").values()
    assert result.label == "pre-lymphodepletion" and result.at == LD
    assert set(result.basis) == basis | {"Condition/dx"}
    ra = ra_for(ev, "disease-burden", "pre-lymphodepletion")
    assert outcome(ra) == "relapse-after-car-t"
    assert ra["prediction"][0]["relativeRisk"] == rr
    assert "extension" not in ra and qualitative(ra) is None and "probabilityDecimal" not in ra["prediction"][0]
    rationale = ra["prediction"][0]["rationale"]
    assert "Applies only to B-ALL" in rationale
    assert ("MRD-only (the reference group)" in rationale) == (rr == 1.0)


@pytest.mark.parametrize(
    ("marrow", "missing"),
    [
        # 3% blasts alone: MRD-only or extramedullary disease? Not known.
        pytest.param([blasts(3, hours(LD, -24))], ("extramedullary-disease",), id="blasts-3-no-emd"),
        # absent extramedullary disease alone: the marrow is not known
        pytest.param([extramedullary("absent", hours(LD, -24))], ("bm-blasts",), id="emd-absent-no-blasts"),
        pytest.param([], ("bm-blasts", "extramedullary-disease"), id="nothing"),
        # a marrow drawn after LD started is not "before lymphodepletion"
        pytest.param(
            [blasts(12, hours(LD, 1)), extramedullary("present", hours(LD, 1))],
            ("bm-blasts", "extramedullary-disease"),
            id="after-ld",
        ),
    ],
)
def test_disease_burden_missing(marrow: list[dict[str, Any]], missing: tuple[str, ...]) -> None:
    ev = evaluate(lymphodepletion(), infusion("Kymriah"), condition("C91.00"), *marrow)
    (result,) = results(ev, "disease-burden").values()
    assert result.missing == missing
    ra = ra_for(ev, "disease-burden", "pre-lymphodepletion")
    assert outcome(ra) == "indeterminate"
    assert "relativeRisk" not in ra["prediction"][0]
    assert "Applies only to B-ALL" in ra["prediction"][0]["rationale"]


def test_disease_burden_without_lymphodepletion_uses_the_infusion() -> None:
    ev = evaluate(infusion("Kymriah"), condition("C91.00"), blasts(20, hours(DAY0, -24), id="bm"))
    (result,) = results(ev, "disease-burden").values()
    assert result.label == "pre-infusion" and result.at == DAY0
    assert result.predictions[0].relative_risk == 2.2  # 20% >= 5%


@pytest.mark.parametrize("dx", ["C83.38", "C82.90", "C90.00", "C91.10"])
def test_disease_burden_only_for_b_all(dx: str) -> None:
    ev = evaluate(lymphodepletion(), infusion("Yescarta"), condition(dx), blasts(12, hours(LD, -24)))
    assert results(ev, "disease-burden") == {}
    assert all(ra["method"]["coding"][0]["code"] != "disease-burden" for ra in score_ras(ev))


def test_disease_burden_without_indication_is_indeterminate() -> None:
    ev = evaluate(lymphodepletion(), blasts(12, hours(LD, -24)))
    (result,) = results(ev, "disease-burden").values()
    assert result.missing == ("indication",)
    assert "Applies only to B-ALL" in result.predictions[0].rationale


def test_disease_burden_boundary_pure() -> None:
    # The pure function on PatientData: 4.9 / 5.0 on each side of ">= 5%".
    def burden(pct: float) -> float | None:
        data = PatientData(
            f.PATIENT_REF,
            samples={
                "bm-blasts": [Sample("bm-blasts", hours(LD, -1), "Observation/bm", value=pct, unit="%")],
                "extramedullary-disease": [
                    Sample("extramedullary-disease", hours(LD, -1), "Observation/emd", code="absent")
                ],
            },
            administrations={"lymphodepletion": [Administration("lymphodepletion", LD, LD, "X/ld")]},
            indications=[("b-all", "Condition/dx")],
        )
        (result,) = disease_burden(data, AT)
        return result.predictions[0].relative_risk

    assert [burden(p) for p in (0.0, 4.9, 4.99, 5.0, 5.01, 80.0)] == [1.0, 1.0, 1.0, 2.2, 2.2, 2.2]


# --- pure functions: the EASIX family on PatientData -------------------------------------------


def test_easix_pure_matches_the_fhir_path() -> None:
    def s(concept: str, value: float, h: float) -> Sample:
        return Sample(concept, hours(LD, h), f"Observation/{concept}", value=value)

    data = PatientData(
        f.PATIENT_REF,
        samples={
            "ldh": [s("ldh", 467, -2)],
            "creatinine": [s("creatinine", 1.0, -2)],
            "platelets": [s("platelets", 100, -2)],
        },
        administrations={"lymphodepletion": [Administration("lymphodepletion", LD, LD, "X/ld")]},
    )
    (pre,) = easix_scores(data, AT, ScoreConfig())
    # 467 x 1.0 / 100 = 4.67: not above the cut-off
    assert pre.value == 4.67 and pre.predictions[0].qualitative == "low"
    names = {(r.method, r.label) for r in all_scores(data, AT, ScoreConfig())}
    assert ("easix", "pre-lymphodepletion") in names and ("m-easix", "lymphodepletion") in names


# --- 7. Every emitted score passes R4B and both npm validators ---------------------------------


@pytest.mark.integration  # npm validators (node)
def test_every_score_assessment_is_valid_fhir() -> None:
    # A B-ALL bundle where every score is computed, an LBCL one, and a nearly empty one where
    # every score is indeterminate.
    computed = evaluate(*full_resources())
    lbcl = evaluate(*full_resources("C83.38", "axicabtagene ciloleucel"))
    empty = evaluate(lab("ldh", 250, hours(LD, -2)))
    assert not [s for s in computed.scores if s.indeterminate]
    assert all(s.indeterminate for s in empty.scores)
    ras = [ra for ev in (computed, lbcl, empty) for ra in score_ras(ev)]
    assert_valid_r4b(ras)
    bundles = [ev.bundle() for ev in (computed, lbcl, empty)]
    assert_valid_r4b(bundles)
    assert_valid_fhir(bundles)  # validates each bundle and each of its entries on its own
    for ra in ras:
        assert ra["status"] == "final"
        assert ra["subject"] == {"reference": f.PATIENT_REF}
        for ext in ra.get("extension", ()):
            assert ext["url"] == SCORE_URL and isinstance(ext["valueDecimal"], float)
        for p in ra["prediction"]:
            if "probabilityDecimal" in p:
                assert 0 <= p["probabilityDecimal"] <= 1


# --- anchoring: which treatment is lymphodepletion, and stale disease status -----------------


def test_earlier_cyclophosphamide_is_not_lymphodepletion() -> None:
    # A bridging cyclophosphamide two months before: EASIX-pre anchors on the real course.
    bridging = lymphodepletion(LD - timedelta(days=60))
    bridging["id"] = "bridging"
    ev = evaluate(bridging, lymphodepletion(), infusion(), *easix_labs(250, 1.2, 150, hours(LD, -2)))
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.value == pytest.approx(2.0)  # 250 x 1.2 / 150, labs 2 h before the real LD
    assert pre.at == LD


def test_lymphodepletion_without_infusion_is_the_last_course() -> None:
    old = lymphodepletion(LD - timedelta(days=60))
    old["id"] = "old-course"
    ev = evaluate(old, lymphodepletion(), *easix_labs(250, 1.2, 150, hours(LD, -2)))
    assert results(ev, "easix")["pre-lymphodepletion"].at == LD


def test_marrow_older_than_30_days_does_not_describe_pre_ld_status() -> None:
    ev = evaluate(
        condition("C91.00"),
        lymphodepletion(),
        infusion("Kymriah"),
        blasts(40.0, LD - timedelta(days=45)),
        extramedullary("absent", hours(LD, -24)),
    )
    burden = results(ev, "disease-burden")["pre-lymphodepletion"]
    assert burden.missing == ("bm-blasts",)


def test_local_product_code_alone_identifies_the_infusion() -> None:
    code = f.cc(f.LOCAL, "cart-infusion.axicabtagene-ciloleucel")
    cart = f.administration(code, at=iso(DAY0), status="completed", id="cart-local")
    ev = evaluate(condition("C83.38"), lymphodepletion(), cart)
    crs, neuro = results(ev, "product-baseline")["infusion"].predictions
    assert (crs.probability, neuro.probability) == (0.93, 0.64)


# --- inputs left out (lenient handling, issue 10): a score they could change is indeterminate ----


def test_left_out_creatinine_that_would_be_picked_makes_easix_pre_indeterminate() -> None:
    # The latest pre-LD creatinine is in an unknown unit: the pre-LD value would be that one.
    bad = lab("creatinine", 0.1, hours(LD, -1), unit="mmol/L", id="crea-bad")
    ev = evaluate(lymphodepletion(), *easix_labs(250, 1.2, 150, hours(LD, -2)), bad)
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.value is None and pre.left_out == ("Observation/crea-bad",)
    assert pre.missing == ("creatinine (Observation/crea-bad: left out)",)
    ra = ra_for(ev, "easix", "pre-lymphodepletion")
    assert score_value(ra) is None and qualitative(ra) is None


def test_left_out_creatinine_older_than_the_one_picked_leaves_easix_pre_standing() -> None:
    # "Before lymphodepletion" takes the latest value: an older unusable one could not be it.
    bad = lab("creatinine", 0.1, hours(LD, -3), unit="mmol/L", id="crea-bad")
    ev = evaluate(lymphodepletion(), *easix_labs(250, 1.2, 150, hours(LD, -2)), bad)
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.value == pytest.approx(2.0) and not pre.left_out
    assert [r.ref for r in ev.left_out] == ["Observation/crea-bad"]  # still named in the warnings


@pytest.mark.parametrize(
    ("offset_h", "indeterminate"),
    [
        pytest.param(-0.5, True, id="nearer-than-the-picked-value"),
        pytest.param(-2.0, True, id="as-near-as-the-picked-value"),
        pytest.param(-3.0, False, id="further-than-the-picked-value"),
        pytest.param(-30.0, False, id="outside-the-24h-window"),
    ],
)
def test_left_out_lab_at_a_pennisi_point_counts_when_it_could_be_the_nearest(
    offset_h: float, indeterminate: bool
) -> None:
    day1 = hours(DAY0, 24)
    labs = [*easix_labs(250, 1.2, 150, hours(day1, 2)), lab("crp", 5, hours(day1, 2), id="crp")]
    bad = lab("crp", 5, hours(day1, offset_h), unit="g/L", id="crp-bad")
    m = results(evaluate(lymphodepletion(), infusion(), *labs, bad), "m-easix")["day +1"]
    assert (m.value is None) is indeterminate
    assert ("crp (Observation/crp-bad: left out)" in m.missing) is indeterminate


def test_left_out_ldh_is_an_indeterminate_easix_time_point_named() -> None:
    when = hours(DAY0, 30)
    bad = lab("ldh", 250, when, unit="ukat/L", id="ldh-bad")
    ev = evaluate(lymphodepletion(), infusion(), lab("creatinine", 1.2, when), lab("platelets", 150, when), bad)
    points = [s for s in ev.scores if s.method == "easix" and s.at == when]
    assert len(points) == 1 and points[0].value is None and points[0].left_out == ("Observation/ldh-bad",)


def test_left_out_lymphodepletion_before_the_recorded_one_moves_the_time_point() -> None:
    early = f.administration(f.cc(f.RXNORM, "3002"), at="2025-12-31", status="completed", id="ld-early")
    ev = evaluate(lymphodepletion(), early, *easix_labs(250, 1.2, 150, hours(LD, -2)))
    pre = results(ev, "easix")["pre-lymphodepletion"]
    assert pre.value is None and pre.left_out == ("MedicationAdministration/ld-early",)


def test_left_out_marrow_result_makes_disease_burden_indeterminate() -> None:
    bad = blasts(250, hours(LD, -24), id="bm-bad")  # 250 % is impossible
    marrow = [blasts(2, hours(LD, -48), id="bm"), extramedullary("absent", hours(LD, -48), id="emd")]
    ev = evaluate(lymphodepletion(), infusion(), condition("C91.00"), *marrow, bad)
    burden = next(s for s in ev.scores if s.method == "disease-burden")
    assert burden.left_out == ("Observation/bm-bad",) and burden.predictions[0].relative_risk is None


def test_left_out_infusion_before_the_recorded_one_makes_product_baseline_indeterminate() -> None:
    early = f.administration(f.cc(f.LOCAL, "cart-infusion", "Kymriah"), at="2026-01-05", status="completed", id="c0")
    ev = evaluate(infusion("axicabtagene ciloleucel"), condition("C83.38"), early)
    (base,) = [s for s in ev.scores if s.method == "product-baseline"]
    assert base.left_out == ("MedicationAdministration/c0",)
    assert all(p.probability is None for p in base.predictions)
