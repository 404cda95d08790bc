"""The older CRS scales and CARTOX CRES (pure core): seed 002's worked example, every cut-off
below/on/above, cross-scale cases for one patient, organ toxicity from labs, FiO2 (charted and
estimated), and the course. Sources: docs/scale-sources.md; clinical-rules.md §2.

The high-dose vasopressor rule (Lee 2014 Table 2) is not verified and has no default; the tests
that need it configure the values transcribed in clinical-rules.md §2 explicitly (HIGH_DOSE).
"""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from service.app.evaluate import SCALES, Grader, courses, evaluate_body, grading_config
from service.codebook import load_codebook
from service.config.settings import Settings
from service.core.astct import GradingConfig
from service.core.config import HighDoseRule, OlderConfig
from service.core.course import CourseConfig
from service.core.model import GradeResult, Sample
from service.core.older import CARTOX10_BANDS, facts_at
from service.devtools.synth import generate_patient
from service.fhir.errors import FhirError
from tests import factories as f
from tests.builders import AT, device, finding, flow, given, obs, patient, ref, sbp, t, temp
from tests.fhir_validators import assert_valid_fhir

# clinical-rules.md §2 "High-dose vasopressors" (Lee 2014 Table 2; unverified, test configuration).
HIGH_DOSE = HighDoseRule(
    norepinephrine_ug_min=20,
    dopamine_ug_kg_min=10,
    phenylephrine_ug_min=200,
    epinephrine_ug_min=10,
    with_vasopressin_ne_eq_ug_min=10,
    combination_ne_eq_ug_min=20,
    dopamine_divisor=2,
    phenylephrine_divisor=10,
    sustained_hours=3,
)
CFG = GradingConfig(older=OlderConfig(high_dose=HIGH_DOSE))
BARE = GradingConfig()  # no high-dose rule, no ULN: the shipped defaults
CODEBOOK = load_codebook(Settings().canonical_base)
OLDER = ("lee2014-crs", "penn-crs", "mskcc-crs", "cartox-crs", "ctcae4-crs", "ctcae5-crs")


def lab(concept: str, value: float, uln: float | None, hours: float = -2) -> Sample:
    return Sample(concept, t(hours), ref("Observation", concept), value=value, shown=f"{value:g}", ref_high=uln)


def labs(creatinine: float = 0.8, ast: float = 20, alt: float = 20) -> tuple[Sample, ...]:
    return lab("creatinine", creatinine, 1.0), lab("ast", ast, 40), lab("alt", alt, 40)


def quiet() -> tuple[Sample, ...]:
    """Normal pressure, room air, normal labs: only what a test adds decides."""
    return sbp(120), device("none"), *labs()


def grades(*items: Sample | object, cfg: GradingConfig = CFG) -> dict[str, int | None]:
    return {m: r.grade for m, r in results(*items, cfg=cfg).items()}


def results(*items: Sample | object, cfg: GradingConfig = CFG) -> dict[str, GradeResult]:
    g = Grader(patient(*items), cfg)  # type: ignore[arg-type]
    return {m: g.grade(m, AT) for m, _ in SCALES}


def fever() -> Sample:
    return temp(39.0)


def pick(g: dict[str, int | None], *methods: str) -> tuple[int | None, ...]:
    return tuple(g[m] for m in methods)


# --- seed 002, Table 2 worked example ---------------------------------------------------------


def test_seed_002_low_dose_pressor_is_lee_2_penn_3_ctcae4_4() -> None:
    """'hypotension requiring low-dose pressors [...] grade 2 CRS on the NCI scale, grade 3 CRS
    on the UPENN/CHOP scale, and grade 4 CRS on the CTCAEv4.0 scale' (seed 002, line 91)."""
    g = grades(fever(), *quiet(), sbp(82, -1), given("norepinephrine", -6, None, rate=5))
    assert pick(g, "lee2014-crs", "penn-crs", "ctcae4-crs") == (2, 3, 4)
    assert pick(g, "astct-crs", "ctcae5-crs", "cartox-crs", "mskcc-crs") == (3, 3, 2, 2)


def test_without_a_high_dose_rule_a_single_pressor_is_indeterminate_where_dose_matters() -> None:
    r = results(fever(), *quiet(), given("norepinephrine", -6, None, rate=5), cfg=BARE)
    for m in ("lee2014-crs", "penn-crs", "mskcc-crs", "cartox-crs"):
        assert r[m].grade is None, m
        assert r[m].missing == ("high-dose vasopressor rule or rates",)
        assert "not verified" in r[m].rationale
    assert "at least grade 3" in r["penn-crs"].rationale and "at least grade 2" in r["lee2014-crs"].rationale
    assert (r["ctcae4-crs"].grade, r["ctcae5-crs"].grade, r["astct-crs"].grade) == (4, 3, 3)


# --- high-dose vasopressors: 19 / 20 / 21 ug/min, sustained 2:59 / 3:00 ------------------------


@pytest.mark.parametrize(
    ("ne_ug_min", "lee", "penn", "mskcc", "cartox"),
    [(19, 2, 3, 2, 2), (20, 3, 4, 4, 3), (21, 3, 4, 4, 3)],
)
def test_norepinephrine_high_dose_boundary(ne_ug_min: float, lee: int, penn: int, mskcc: int, cartox: int) -> None:
    g = grades(fever(), *quiet(), given("norepinephrine", -4, None, rate=ne_ug_min))
    assert pick(g, "lee2014-crs", "penn-crs", "mskcc-crs", "cartox-crs") == (lee, penn, mskcc, cartox)


@pytest.mark.parametrize(("minutes", "lee"), [(179, 2), (180, 3), (181, 3)])
def test_high_dose_must_be_sustained_3_hours(minutes: int, lee: int) -> None:
    start = -minutes / 60
    g = grades(fever(), *quiet(), given("norepinephrine", start, 0, rate=25))
    assert g["lee2014-crs"] == lee


def test_high_dose_run_across_rate_changes_counts_as_one_run() -> None:
    g = grades(
        fever(),
        *quiet(),
        given("norepinephrine", -5, -3.5, rate=22),
        given("norepinephrine", -3.5, -1.5, rate=30),  # 1.5 h + 2 h at >= 20 ug/min, touching
        given("norepinephrine", -1.5, None, rate=5),
    )
    assert g["lee2014-crs"] == 3


@pytest.mark.parametrize(
    ("agent", "rate", "high"),
    [
        ("dopamine", 9.9, False),
        ("dopamine", 10, True),
        ("phenylephrine", 199, False),
        ("phenylephrine", 200, True),
        ("epinephrine", 9, False),
        ("epinephrine", 10, True),
    ],
)
def test_single_agent_thresholds(agent: str, rate: float, high: bool) -> None:
    g = grades(fever(), *quiet(), given(agent, -4, None, rate=rate))
    assert g["lee2014-crs"] == (3 if high else 2)


def test_a_rate_missing_leaves_high_dose_unknown() -> None:
    r = results(fever(), *quiet(), given("norepinephrine", -4, None))
    assert r["lee2014-crs"].grade is None and "without a recorded rate" in r["lee2014-crs"].rationale


# --- norepinephrine with vasopressin ------------------------------------------------------------


@pytest.mark.parametrize(("ne_ug_min", "lee", "penn"), [(9, 2, 3), (10, 3, 4), (11, 3, 4)])
def test_norepinephrine_with_vasopressin(ne_ug_min: float, lee: int, penn: int) -> None:
    """With vasopressin, high-dose is NE equivalent >= 10 ug/min; vasopressin is never 'multiple'."""
    g = grades(
        fever(), *quiet(), given("norepinephrine", -4, None, rate=ne_ug_min), given("vasopressin", -4, None, rate=0.03)
    )
    assert pick(g, "lee2014-crs", "penn-crs") == (lee, penn)
    assert pick(g, "astct-crs", "ctcae5-crs", "ctcae4-crs") == (3, 3, 4)


def test_vasopressin_alone_is_pressor_support_only_for_ctcae4_and_mskcc() -> None:
    g = grades(fever(), *quiet(), given("vasopressin", -4, None, rate=0.03))
    assert pick(g, "ctcae4-crs", "mskcc-crs") == (4, 2)
    assert pick(g, "lee2014-crs", "ctcae5-crs", "astct-crs") == (1, 1, 1)


def test_combination_without_vasopressin_uses_the_norepinephrine_equivalent() -> None:
    # 5 + 100 / 10 = 15 ug/min < 20: multiple but not high-dose.
    g = grades(fever(), *quiet(), given("norepinephrine", -4, None, rate=5), given("phenylephrine", -4, None, rate=100))
    assert pick(g, "lee2014-crs", "cartox-crs", "penn-crs", "ctcae5-crs", "astct-crs") == (3, 3, 3, 4, 4)
    # 15 + 100 / 10 = 25 ug/min >= 20: high-dose.
    g = grades(
        fever(), *quiet(), given("norepinephrine", -4, None, rate=15), given("phenylephrine", -4, None, rate=100)
    )
    assert pick(g, "penn-crs", "mskcc-crs") == (4, 4)


# --- vasopressor duration (MSKCC): 23 h 59 min / 24 h ----------------------------------------------


@pytest.mark.parametrize(("minutes", "mskcc"), [(23 * 60 + 59, 2), (24 * 60, 3), (24 * 60 + 1, 3)])
def test_mskcc_vasopressor_duration(minutes: int, mskcc: int) -> None:
    g = grades(fever(), *quiet(), given("norepinephrine", -minutes / 60, 0, rate=5))
    assert g["mskcc-crs"] == mskcc
    assert g["lee2014-crs"] == 2  # duration is not a Lee criterion


def test_mskcc_duration_joins_touching_administrations_and_starts_before_the_window() -> None:
    g = grades(fever(), *quiet(), given("norepinephrine", -30, -10, rate=5), given("norepinephrine", -10, None, rate=4))
    assert g["mskcc-crs"] == 3


# --- FiO2 39 / 40 / 41 % -----------------------------------------------------------------------------


@pytest.mark.parametrize(("fio2", "fio2_grade"), [(39, 2), (40, 3), (41, 3)])
def test_charted_fio2_boundary(fio2: float, fio2_grade: int) -> None:
    g = grades(fever(), sbp(120), *labs(), device("face-mask"), flow(8), obs("fio2", -2, fio2))
    assert pick(g, "lee2014-crs", "mskcc-crs", "cartox-crs", "ctcae5-crs") == (fio2_grade,) * 4
    assert pick(g, "penn-crs", "ctcae4-crs") == (3, 1)


@pytest.mark.parametrize(
    ("flow_l_min", "lee", "shown"),
    [(1, 2, "21-25%"), (4, 2, "30%"), (5, None, "30-40%"), (6, 3, "40%"), (8, 3, "40%"), (12, 3, "50-100%")],
)
def test_fio2_estimated_from_low_flow_nasal_cannula(flow_l_min: float, lee: int | None, shown: str) -> None:
    r = results(fever(), sbp(120), *labs(), device("low-flow-nasal-cannula"), flow(flow_l_min))
    assert r["lee2014-crs"].grade == lee
    assert f"FiO2 estimated from oxygen flow {flow_l_min:g} at" in r["lee2014-crs"].rationale
    assert f" as {shown} (" in r["lee2014-crs"].rationale
    assert "Atlanta" in r["lee2014-crs"].rationale


def test_estimate_can_be_switched_off_and_then_a_charted_fio2_is_needed() -> None:
    cfg = GradingConfig(older=OlderConfig(high_dose=HIGH_DOSE, fio2_points=()))
    r = results(fever(), sbp(120), *labs(), device("low-flow-nasal-cannula"), flow(4), cfg=cfg)
    assert r["lee2014-crs"].grade is None and r["lee2014-crs"].missing == ("fio2",)
    assert r["penn-crs"].grade == 3  # Penn grades any oxygen requirement


def test_high_flow_without_charted_fio2_is_indeterminate_for_fio2_scales() -> None:
    r = results(fever(), sbp(120), *labs(), device("high-flow-nasal-cannula"), flow(30))
    assert r["lee2014-crs"].grade is None and "no estimate for this device" in r["lee2014-crs"].rationale
    assert (r["penn-crs"].grade, r["astct-crs"].grade) == (3, 3)


def test_device_without_flow_is_not_an_oxygen_requirement() -> None:
    r = results(fever(), sbp(120), *labs(), device("low-flow-nasal-cannula"))
    assert r["penn-crs"].grade is None and r["lee2014-crs"].grade is None


# --- ventilator versus non-invasive positive pressure -----------------------------------------------


def test_fever_on_bipap_with_no_pressors() -> None:
    r = results(fever(), sbp(120), *labs(), device("bipap"))
    g = {m: x.grade for m, x in r.items()}
    assert pick(g, "astct-crs", "penn-crs", "ctcae4-crs") == (4, 3, 1)
    for m in ("lee2014-crs", "mskcc-crs", "cartox-crs", "ctcae5-crs"):
        assert g[m] is None and r[m].missing == ("fio2",), m
        assert "CPAP and BiPAP are oxygen support" in r[m].rationale
    g = grades(fever(), sbp(120), *labs(), device("bipap"), obs("fio2", -2, 50))
    assert pick(g, "lee2014-crs", "mskcc-crs", "cartox-crs", "ctcae5-crs") == (3, 3, 3, 3)


def test_invasive_ventilation_is_grade_4_on_every_crs_scale() -> None:
    g = grades(fever(), sbp(120), *labs(), device("mechanical-ventilation"), obs("fio2", -2, 35))
    assert all(g[m] == 4 for m in ("astct-crs", *OLDER))


# --- hypotension without a vasopressor -----------------------------------------------------------


def test_hypotension_without_pressor() -> None:
    r = results(fever(), *quiet(), sbp(85, -1))
    g = {m: x.grade for m, x in r.items()}
    assert pick(g, "lee2014-crs", "cartox-crs", "ctcae5-crs", "astct-crs") == (2, 2, 2, 2)
    assert pick(g, "penn-crs", "mskcc-crs", "ctcae4-crs") == (1, 1, 1)
    assert "IV fluids" in r["penn-crs"].rationale


# --- organ toxicity (CTCAE v5.0 by default) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "ctcae"),
    [(1.0, 0), (1.01, 1), (1.5, 1), (1.51, 2), (3.0, 2), (3.01, 3), (6.0, 3), (6.01, 4)],
)
def test_creatinine_uln_boundaries(ratio: float, ctcae: int) -> None:
    f = facts_at(patient(fever(), lab("creatinine", ratio * 1.0, 1.0)), AT, CFG)
    assert f.organ["creatinine"].grade == ctcae


@pytest.mark.parametrize(
    ("ratio", "ctcae"),
    [(1.0, 0), (1.01, 1), (3.0, 1), (3.01, 2), (5.0, 2), (5.01, 3), (20.0, 3), (20.01, 4)],
)
def test_transaminase_uln_boundaries(ratio: float, ctcae: int) -> None:
    f = facts_at(patient(lab("ast", ratio * 40, 40), lab("alt", 10, 40)), AT, CFG)
    assert f.organ["transaminase"].grade == ctcae


def ld_and_baseline(concept: str, value: float, uln: float) -> tuple[object, ...]:
    """Lymphodepletion 5 days before AT with a baseline lab 12 h before it, day 0 after it."""
    return (
        given("lymphodepletion", -120, -118),
        lab(concept, value, uln, -132),
        given("cart-infusion", -48, -48),
    )


@pytest.mark.parametrize(("version", "now", "grade"), [("5.0", 0.74, 0), ("5.0", 0.76, 2), ("4.03", 0.6, 1)])
def test_creatinine_rise_over_baseline(version: str, now: float, grade: int) -> None:
    """v5: '>1.5 - 3.0 x baseline' is grade 2; v4.03 also has '>1 - 1.5 x baseline' grade 1."""
    cfg = GradingConfig(older=OlderConfig(ctcae_organ_version=version))
    f = facts_at(patient(*ld_and_baseline("creatinine", 0.5, 1.2), lab("creatinine", now, 1.2)), AT, cfg)  # type: ignore[arg-type]
    assert f.organ["creatinine"].grade == grade


def test_organ_facts_are_shared_only_by_windows_with_the_same_labs_and_config() -> None:
    """Organ facts are made once per distinct window (the course asks every hour): one patient
    graded under v5.0 and v4.03 keeps both answers, and a window that loses its lab is unknown."""
    data = patient(*ld_and_baseline("creatinine", 0.5, 1.2), lab("creatinine", 0.6, 1.2))  # type: ignore[arg-type]
    v5, v4 = (GradingConfig(older=OlderConfig(ctcae_organ_version=v)) for v in ("5.0", "4.03"))
    assert facts_at(data, AT, v5).organ["creatinine"].grade == 0
    assert facts_at(data, AT, v4).organ["creatinine"].grade == 1  # 1.2 x baseline
    hour_later = facts_at(data, AT + timedelta(hours=1), v5).organ
    assert hour_later is facts_at(data, AT, v5).organ  # the same lab in both windows
    assert facts_at(data, AT + timedelta(hours=23), v5).organ["creatinine"].grade is None


def test_transaminase_with_abnormal_baseline_uses_baseline_multiples() -> None:
    # Baseline 80 U/L (ULN 40: abnormal). 130 = 1.63 x baseline -> grade 1 (3.25 x ULN would be 2).
    items = (*ld_and_baseline("ast", 80, 40), lab("ast", 130, 40), lab("alt", 20, 40))
    f = facts_at(patient(*items), AT, CFG)  # type: ignore[arg-type]
    assert f.organ["transaminase"].grade == 1 and "abnormal baseline" in f.organ["transaminase"].why


def test_fever_with_grade_2_creatinine() -> None:
    g = grades(fever(), sbp(120), device("none"), *labs(creatinine=2.0))
    assert pick(g, "lee2014-crs", "cartox-crs", "penn-crs") == (2, 2, 2)
    assert pick(g, "mskcc-crs", "ctcae4-crs", "ctcae5-crs", "astct-crs") == (1, 1, 1, 1)


def test_fever_with_grade_4_transaminitis() -> None:
    g = grades(fever(), sbp(120), device("none"), *labs(ast=900))
    assert pick(g, "lee2014-crs", "cartox-crs", "penn-crs") == (3, 3, 3)  # "grade 4 transaminitis" is 3
    assert pick(g, "mskcc-crs", "ctcae4-crs", "ctcae5-crs", "astct-crs") == (1, 1, 1, 1)


def test_grade_4_creatinine_is_lee_4() -> None:
    assert grades(fever(), sbp(120), device("none"), *labs(creatinine=6.5))["lee2014-crs"] == 4


def test_uln_falls_back_to_configuration_and_is_never_guessed() -> None:
    no_range = (lab("creatinine", 2.0, None), lab("ast", 20, 40), lab("alt", 20, 40))
    r = results(fever(), sbp(120), device("none"), *no_range)
    assert r["lee2014-crs"].grade is None and r["lee2014-crs"].missing == ("ULN for creatinine",)
    cfg = GradingConfig(older=OlderConfig(uln_creatinine_mg_dl=1.0))
    r = results(fever(), sbp(120), device("none"), *no_range, cfg=cfg)
    assert r["lee2014-crs"].grade == 2 and "configured ULN" in r["lee2014-crs"].rationale


def test_missing_labs_make_organ_scales_indeterminate_only() -> None:
    r = results(fever(), sbp(120), device("none"))
    assert r["lee2014-crs"].grade is None and set(r["lee2014-crs"].missing) == {"creatinine", "ast / alt"}
    assert (r["ctcae5-crs"].grade, r["mskcc-crs"].grade, r["ctcae4-crs"].grade) == (1, 1, 1)


# --- the CRS gate, masked fever, and what the data cannot show --------------------------------------


def test_no_fever_is_grade_0_and_no_temperature_is_indeterminate_on_every_scale() -> None:
    g = grades(temp(37.2), *quiet(), given("norepinephrine", -4, None, rate=30))
    assert all(g[m] == 0 for m in ("astct-crs", *OLDER))
    r = results(*quiet())
    assert all(r[m].grade is None and r[m].missing == ("body-temperature",) for m in ("astct-crs", *OLDER))


def test_masked_fever_keeps_the_older_scales_grading() -> None:
    items = (
        given("cart-infusion", -72, -72),
        temp(39.5, -30),
        given("tocilizumab", -28, -28),
        temp(37.0, -2),
        *quiet(),
        given("norepinephrine", -4, None, rate=5),
    )
    g = grades(*items)
    assert pick(g, "lee2014-crs", "penn-crs", "ctcae4-crs", "astct-crs") == (2, 3, 4, 3)


def test_rationale_names_the_criteria_the_data_cannot_show() -> None:
    r = results(fever(), *quiet())
    assert "infusion interruption" in r["ctcae4-crs"].rationale
    assert "hospitalisation" in r["penn-crs"].rationale
    assert r["ctcae4-crs"].grade == 1 and "CTCAE v4.03" in r["ctcae4-crs"].scale


# --- CARTOX CRES ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("score", "grade"), [(s, g) for lo, hi, g in CARTOX10_BANDS for s in {lo, hi}])
def test_cartox10_bands(score: int, grade: int) -> None:
    r = results(obs("cartox-10", -2, float(score)))
    assert r["cartox-cres"].grade == grade


def test_cres_obtunded_is_grade_4_and_unverified_rows_are_never_guessed() -> None:
    assert results(obs("cartox-10", -2, 8.0), finding("consciousness", "unarousable"))["cartox-cres"].grade == 4
    r = results(obs("cartox-10", -2, 9.0), finding("seizure", "rapidly-resolving"))["cartox-cres"]
    assert r.grade is None and "not verified" in r.rationale
    assert results()["cartox-cres"].grade is None


# --- the course of every scale -------------------------------------------------------------------------


def test_lee_course_peaks_at_3_on_day_4_and_resolves_on_day_7() -> None:
    day0 = AT - timedelta(days=10)

    def at(hours: float) -> float:
        return (day0 + timedelta(hours=hours) - AT).total_seconds() / 3600

    items: list[object] = [given("cart-infusion", at(0), at(0))]
    for hour in range(0, 10 * 24, 4):
        febrile = 72 <= hour < 168  # fever days 3-6, last at 164 h
        items += [
            temp(38.8 if febrile else 36.8, at(hour)),
            sbp(118, at(hour)),
            *[lab("creatinine", 0.8, 1.0, at(hour)), lab("ast", 20, 40, at(hour)), lab("alt", 20, 40, at(hour))],
        ]
        on_o2 = 96 <= hour < 120  # day 4: FiO2 45%
        items += [obs("fio2", at(hour), 45.0 if on_o2 else 21.0)]
    out = {c.method: c for c, _ in courses(Grader(patient(*items), CFG), AT, CourseConfig())}  # type: ignore[arg-type]
    lee = out["lee2014-crs"]
    assert lee.peak_grade == 3 and lee.peak_time == day0 + timedelta(hours=96)
    assert lee.onset == day0 + timedelta(hours=72)
    # The last fever (164 h) leaves the 24 h window at 189 h: grade 0 from then on (day 7).
    assert lee.resolution == day0 + timedelta(hours=189) and lee.duration == timedelta(hours=189 - 72)
    assert out["ctcae4-crs"].peak_grade == 1


def test_organ_toxicity_after_masked_fever_needs_another_active_sign() -> None:
    masked = (given("cart-infusion", -96, -96), temp(39.5, -80), given("tocilizumab", -78, -78), temp(37.0, -2))
    r = results(*masked, sbp(120), device("none"), *labs(creatinine=2.0))
    assert (r["lee2014-crs"].grade, r["penn-crs"].grade) == (0, 0)
    assert "Organ toxicity not graded" in r["lee2014-crs"].rationale
    g = grades(*masked, sbp(120), device("none"), obs("fio2", -2, 30), *labs(creatinine=2.0))
    assert pick(g, "lee2014-crs", "penn-crs") == (2, 3)


# --- through FHIR: referenceRange, CARTOX-10, settings ---------------------------------------------


def fhir_at(hours: float) -> str:
    return t(hours).isoformat()


def creatinine_obs(value: float, unit: str, high: dict[str, object] | None, when: str) -> dict[str, object]:
    extra: dict[str, object] = {"valueQuantity": f.quantity(value, unit)}
    if high is not None:
        extra["referenceRange"] = [{"high": high}]
    return f.observation(("http://loinc.org", "14682-9"), when, id="creat", **extra)


def test_reference_range_gives_the_uln_in_the_canonical_unit() -> None:
    when = fhir_at(-2)
    # 221 umol/L against a ULN of 106 umol/L = 2.08 x ULN -> CTCAE grade 2 -> Lee 2.
    body = f.body(
        f.patient(),
        f.temperature(39.0, when),
        f.systolic(120, when),
        f.oxygen_device("none", when),
        creatinine_obs(221, "umol/L", f.quantity(106, "umol/L"), when),
        f.observation(
            ("http://loinc.org", "1920-8"),
            when,
            valueQuantity=f.quantity(20, "U/L"),
            referenceRange=[{"high": f.quantity(40, "U/L")}],
        ),
        f.observation(
            ("http://loinc.org", "1742-6"),
            when,
            valueQuantity=f.quantity(20, "U/L"),
            referenceRange=[{"high": f.quantity(40, "U/L")}],
        ),
    )
    ev = evaluate_body(body, CODEBOOK, Settings(), AT, AT)
    lee = next(r for r in ev.results if r.method == "lee2014-crs")
    assert lee.grade == 2 and "2.08 x ULN 1.1991" in lee.rationale and "Observation/creat" in lee.basis


def test_reference_range_in_an_unknown_unit_is_rejected_with_its_path() -> None:
    when = fhir_at(-2)
    body = f.body(f.patient(), creatinine_obs(1.0, "mg/dL", f.quantity(1.2, "mmol/L"), when))
    with pytest.raises(FhirError) as err:
        evaluate_body(body, CODEBOOK, Settings(), AT, AT, strict=True)
    assert err.value.status == 422
    assert err.value.issues[0].expression == "Bundle.entry[1].resource.referenceRange[0].high.code"


def test_cartox10_from_the_codebook() -> None:
    when = fhir_at(-2)
    obs_ = f.observation((f"{Settings().canonical_base}/CodeSystem/local", "cartox-10"), when, valueInteger=5)
    ev = evaluate_body(f.body(f.patient(), obs_), CODEBOOK, Settings(), AT, AT)
    cres = next(r for r in ev.results if r.method == "cartox-cres")
    assert cres.grade == 2


def test_high_dose_rule_and_fio2_table_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IECTOX_HIGH_DOSE_VASOPRESSORS", json.dumps(dataclasses.asdict(HIGH_DOSE)))
    monkeypatch.setenv("IECTOX_FIO2_ESTIMATE_POINTS", "[[0, 21], [5, 40]]")
    cfg = grading_config(Settings())
    assert cfg.older.high_dose == HIGH_DOSE and cfg.older.fio2_points == ((0.0, 21.0), (5.0, 40.0))


@pytest.mark.integration  # npm validators (node)
def test_every_scale_emits_resources_that_pass_both_npm_validators() -> None:
    settings = Settings(high_dose_vasopressors=HIGH_DOSE)
    start = datetime(2026, 1, 5, 8, tzinfo=UTC)
    p = generate_patient(
        random.Random(7),  # noqa: S311 (synthetic data, not security)
        0,
        "crs-4",
        days=10,
        base=settings.canonical_base,
        start=start,
    )
    ev = evaluate_body(orjson.dumps(p.bundle), CODEBOOK, settings, None, start)
    methods = {ra["method"]["coding"][0]["code"] for ra in ev.assessments}
    assert {m for m, _ in SCALES} <= methods
    assert {r.method: r.grade for r in ev.results if r.method in OLDER}  # graded, not empty
    assert_valid_fhir([ev.bundle()])
