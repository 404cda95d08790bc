"""ASTCT 2019 CRS and ICANS grading (pure core, no FHIR): every cut-off below, on and above.

Source: Lee DW et al., BBMT 2019;25:625-638 (clinical-rules.md §1); the known mistakes of
public calculators (clinical-rules.md §4) each have a row here.
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from service.core.astct import (
    CONSCIOUSNESS_GRADE,
    EDEMA_GRADE,
    MOTOR_GRADE,
    OXYGEN_DEVICE_GRADE,
    SEIZURE_GRADE,
    GradingConfig,
    HypotensionRule,
    grade_crs,
    grade_icans,
)
from service.core.model import Administration, GradeResult, Sample
from tests.builders import (
    ADULT,
    AT,
    bolus,
    born_days_ago,
    born_years_ago,
    capd,
    device,
    finding,
    flow,
    given,
    ice,
    mean_ap,
    obs,
    patient,
    sbp,
    temp,
)

CFG = GradingConfig()


def crs(*items: Sample | Administration, birth: date | None = ADULT, cfg: GradingConfig = CFG) -> GradeResult:
    return grade_crs(patient(*items, birth=birth), AT, cfg)


def icans(*items: Sample | Administration, birth: date | None = ADULT, cfg: GradingConfig = CFG) -> GradeResult:
    return grade_icans(patient(*items, birth=birth), AT, cfg)


def normal() -> tuple[Sample, Sample]:
    """Normal blood pressure and room air: CRS decided by fever alone."""
    return sbp(120), device("none")


# --- CRS: fever -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("celsius", "grade"),
    [
        pytest.param(37.9, 0, id="37.9-below"),
        pytest.param(38.0, 1, id="38.0-on"),
        pytest.param(38.1, 1, id="38.1-above"),
        pytest.param(36.0, 0, id="36.0-normal"),
        pytest.param(40.5, 1, id="40.5-high"),
    ],
)
def test_fever_cutoff(celsius: float, grade: int) -> None:
    result = crs(temp(celsius), *normal())
    assert result.grade == grade
    assert result.missing == ()


def test_afebrile_is_grade_0_even_without_bp_or_oxygen_data() -> None:
    # Fever is required (no masking therapy): nothing else can make it CRS.
    assert crs(temp(37.5)).grade == 0


def test_highest_temperature_in_window_decides() -> None:
    result = crs(temp(38.6, -20), temp(37.0, -1), *normal())
    assert result.grade == 1
    assert "38.6" in result.rationale


@pytest.mark.parametrize(
    "items",
    [
        pytest.param((), id="no-data"),
        pytest.param(normal(), id="bp-and-room-air-but-no-temperature"),
        pytest.param((sbp(80), given("norepinephrine", -3)), id="pressor-but-no-temperature"),
    ],
)
def test_no_temperature_is_indeterminate_never_0(items: tuple[Sample | Administration, ...]) -> None:
    result = crs(*items)
    assert result.grade is None
    assert result.indeterminate
    assert "body-temperature" in result.missing
    assert result.rationale.lower().startswith("indeterminate")


@pytest.mark.parametrize(
    ("hours", "used"),
    [
        pytest.param(-24 - 1 / 60, False, id="1-min-before-window"),
        pytest.param(-24, True, id="exactly-at-minus-24h-inside"),
        pytest.param(-24 + 1 / 60, True, id="1-min-inside-window"),
        pytest.param(0, True, id="exactly-at"),
        pytest.param(1 / 60, False, id="1-min-after-at"),
    ],
)
def test_temperature_window_boundary(hours: float, used: bool) -> None:
    result = crs(temp(39.0, hours), *normal())
    if used:
        assert result.grade == 1
    else:
        assert result.grade is None
        assert result.missing == ("body-temperature",)


def test_window_is_configurable() -> None:
    cfg = GradingConfig(window=timedelta(hours=48))
    assert crs(temp(39.0, -30), sbp(120, -30), device("none", -30), cfg=cfg).grade == 1
    assert crs(temp(39.0, -30), sbp(120, -30), device("none", -30)).grade is None


# --- CRS: missing hypotension / hypoxia data ---------------------------------------------


def test_fever_without_bp_or_pressor_is_indeterminate_naming_blood_pressure() -> None:
    result = crs(temp(39.0), device("none"))
    assert result.grade is None
    assert len(result.missing) == 1
    assert "systolic-bp" in result.missing[0]
    assert "mean-arterial-pressure" in result.missing[0]


def test_fever_without_oxygen_data_is_indeterminate() -> None:
    result = crs(temp(39.0), sbp(120))
    assert result.grade is None
    assert len(result.missing) == 1
    assert "oxygen-device" in result.missing[0]
    assert "oxygen-flow" in result.missing[0]


def test_indeterminate_says_the_floor_from_the_data_present() -> None:
    result = crs(temp(39.0), sbp(85))  # grade >= 2 from hypotension, hypoxia unknown
    assert result.grade is None
    assert "at least grade 2" in result.rationale


def test_fever_and_two_pressors_is_4_without_oxygen_data() -> None:
    # Nothing missing can make grade 4 worse.
    result = crs(temp(39.0), given("norepinephrine", -6), given("epinephrine", -4))
    assert result.grade == 4
    assert result.missing == ()


def test_fever_and_positive_pressure_is_4_without_bp_data() -> None:
    result = crs(temp(39.0), device("bipap"))
    assert result.grade == 4
    assert result.missing == ()


# --- CRS: hypotension not requiring vasopressors (configurable rule) ------------------------

ADULT_RULE = "systolic < 90 mmHg or MAP < 65 mmHg"


@pytest.mark.parametrize(
    ("pressures", "grade"),
    [
        pytest.param((sbp(89),), 2, id="sbp-89-below"),
        pytest.param((sbp(90),), 1, id="sbp-90-on"),
        pytest.param((sbp(91),), 1, id="sbp-91-above"),
        pytest.param((mean_ap(64),), 2, id="map-64-below"),
        pytest.param((mean_ap(65),), 1, id="map-65-on"),
        pytest.param((mean_ap(66),), 1, id="map-66-above"),
        pytest.param((sbp(120), mean_ap(64)), 2, id="normal-sbp-low-map"),
        pytest.param((sbp(89), mean_ap(80)), 2, id="low-sbp-normal-map"),
        pytest.param((sbp(120, -3), sbp(85, -10)), 2, id="any-low-reading-in-window"),
        pytest.param((sbp(85, -25), sbp(120, -3)), 1, id="low-reading-before-window"),
    ],
)
def test_adult_hypotension_rule(pressures: tuple[Sample, ...], grade: int) -> None:
    # Hypotension without vasopressor = CRS grade 2; no hypotension = grade 1 (fever only).
    result = crs(temp(39.0), device("none"), *pressures)
    assert result.grade == grade
    assert ADULT_RULE in result.rationale  # the rule is printed whenever it is used
    assert "configurable" in result.rationale


def test_adult_rule_used_when_age_unknown_and_says_so() -> None:
    result = crs(temp(39.0), device("none"), sbp(89), birth=None)
    assert result.grade == 2
    assert ADULT_RULE in result.rationale
    assert "age unknown, adult rule used" in result.rationale


# (birth date, systolic, CRS grade, printed limit): PALS systolic hypotension limits.
PEDIATRIC = [
    pytest.param(born_days_ago(10), 59, 2, 60, id="neonate-10d-59"),
    pytest.param(born_days_ago(10), 60, 1, 60, id="neonate-10d-60"),
    pytest.param(born_days_ago(28), 59, 2, 60, id="neonate-28d-59"),
    pytest.param(born_days_ago(28), 60, 1, 60, id="neonate-28d-60"),
    pytest.param(born_days_ago(29), 69, 2, 70, id="infant-29d-69"),
    pytest.param(born_days_ago(29), 70, 1, 70, id="infant-29d-70"),
    pytest.param(born_years_ago(0, 182), 69, 2, 70, id="infant-6mo-69"),
    pytest.param(born_years_ago(0, 182), 70, 1, 70, id="infant-6mo-70"),
    pytest.param(born_years_ago(1, 30), 71, 2, 72, id="age-1-71"),
    pytest.param(born_years_ago(1, 30), 72, 1, 72, id="age-1-72"),
    pytest.param(born_years_ago(5, 180), 79, 2, 80, id="age-5-79"),
    pytest.param(born_years_ago(5, 180), 80, 1, 80, id="age-5-80"),
    pytest.param(born_years_ago(5, 180), 81, 1, 80, id="age-5-81"),
    pytest.param(born_years_ago(9, 180), 87, 2, 88, id="age-9-87"),
    pytest.param(born_years_ago(9, 180), 88, 1, 88, id="age-9-88"),
    pytest.param(born_years_ago(10, 30), 89, 2, 90, id="age-10-89"),
    pytest.param(born_years_ago(10, 30), 90, 1, 90, id="age-10-90"),
    pytest.param(born_years_ago(17, 180), 89, 2, 90, id="age-17-89"),
    pytest.param(born_years_ago(17, 180), 90, 1, 90, id="age-17-90"),
    # A birthday on the `at` date counts as having turned that age.
    pytest.param(born_years_ago(1), 71, 2, 72, id="1st-birthday-71"),
    pytest.param(born_years_ago(5), 79, 2, 80, id="5th-birthday-79"),
    pytest.param(born_years_ago(5), 80, 1, 80, id="5th-birthday-80"),
    pytest.param(born_years_ago(5, -1), 77, 2, 78, id="day-before-5th-birthday-77"),
    pytest.param(born_years_ago(5, -1), 78, 1, 78, id="day-before-5th-birthday-78"),
    pytest.param(born_years_ago(10), 89, 2, 90, id="10th-birthday-89"),
]


@pytest.mark.parametrize(("birth", "systolic", "grade", "limit"), PEDIATRIC)
def test_pediatric_pals_systolic_limits(birth: date, systolic: float, grade: int, limit: int) -> None:
    result = crs(temp(39.0), device("none"), sbp(systolic), birth=birth)
    assert result.grade == grade
    assert f"systolic < {limit} mmHg (PALS limit for age" in result.rationale


def test_child_rule_does_not_use_map() -> None:
    # PALS defines pediatric hypotension by systolic pressure only.
    result = crs(temp(39.0), device("none"), sbp(100), mean_ap(55), birth=born_years_ago(5, 180))
    assert result.grade == 1


@pytest.mark.parametrize(
    ("birth", "pressure", "grade"),
    [
        pytest.param(born_years_ago(18, -1), mean_ap(60), 1, id="day-before-18th-birthday-map-not-used"),
        pytest.param(born_years_ago(18), mean_ap(64), 2, id="18th-birthday-map-used"),
        pytest.param(born_years_ago(18, 30), mean_ap(64), 2, id="age-18-map-64"),
        pytest.param(born_years_ago(18, 30), mean_ap(65), 1, id="age-18-map-65"),
    ],
)
def test_adult_rule_from_age_18(birth: date, pressure: Sample, grade: int) -> None:
    assert crs(temp(39.0), device("none"), sbp(120), pressure, birth=birth).grade == grade


@pytest.mark.parametrize(
    ("rule", "birth", "pressures", "grade", "printed"),
    [
        pytest.param(
            HypotensionRule(adult_sbp_below_mmhg=100),
            ADULT,
            (sbp(99),),
            2,
            "systolic < 100 mmHg or MAP < 65 mmHg",
            id="sbp-100-99",
        ),
        pytest.param(
            HypotensionRule(adult_sbp_below_mmhg=100),
            ADULT,
            (sbp(100),),
            1,
            "systolic < 100 mmHg or MAP < 65 mmHg",
            id="sbp-100-100",
        ),
        pytest.param(
            HypotensionRule(adult_map_below_mmhg=70),
            ADULT,
            (mean_ap(69),),
            2,
            "systolic < 90 mmHg or MAP < 70 mmHg",
            id="map-70-69",
        ),
        pytest.param(
            HypotensionRule(adult_map_below_mmhg=70),
            ADULT,
            (mean_ap(70),),
            1,
            "systolic < 90 mmHg or MAP < 70 mmHg",
            id="map-70-70",
        ),
        pytest.param(
            HypotensionRule(adult_from_age_years=21),
            born_years_ago(19, 30),
            (sbp(120), mean_ap(60)),
            1,
            "systolic < 90 mmHg (PALS limit for age",
            id="adult-from-21-age-19-is-child",
        ),
        pytest.param(
            HypotensionRule(adult_from_age_years=16),
            born_years_ago(17, 30),
            (sbp(120), mean_ap(60)),
            2,
            "systolic < 90 mmHg or MAP < 65 mmHg",
            id="adult-from-16-age-17-is-adult",
        ),
    ],
)
def test_hypotension_rule_is_configurable(
    rule: HypotensionRule, birth: date, pressures: tuple[Sample, ...], grade: int, printed: str
) -> None:
    result = crs(temp(39.0), device("none"), *pressures, birth=birth, cfg=GradingConfig(hypotension=rule))
    assert result.grade == grade
    assert printed in result.rationale


# --- CRS: hypoxia -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("litres", "grade"),
    [
        pytest.param(0.0, 1, id="0-no-oxygen"),
        pytest.param(0.5, 2, id="0.5-low-flow"),
        pytest.param(5.9, 2, id="5.9-below"),
        pytest.param(6.0, 2, id="6.0-on-is-low-flow"),  # the known mistake is >= 6
        pytest.param(6.1, 3, id="6.1-above-is-high-flow"),
        pytest.param(40.0, 3, id="40-high-flow"),
    ],
)
def test_oxygen_flow_cutoff(litres: float, grade: int) -> None:
    result = crs(temp(39.0), sbp(120), flow(litres))
    assert result.grade == grade
    assert "> 6 L/min" in result.rationale


# CRS grade with fever: max(1, hypoxia grade).
DEVICES = [
    pytest.param("none", 1, id="none"),
    pytest.param("low-flow-nasal-cannula", 2, id="low-flow-nasal-cannula"),
    pytest.param("blow-by", 2, id="blow-by"),
    pytest.param("high-flow-nasal-cannula", 3, id="high-flow-nasal-cannula"),
    pytest.param("face-mask", 3, id="face-mask"),
    pytest.param("non-rebreather", 3, id="non-rebreather"),
    pytest.param("venturi", 3, id="venturi"),
    pytest.param("cpap", 4, id="cpap"),
    pytest.param("bipap", 4, id="bipap"),
    pytest.param("mechanical-ventilation", 4, id="mechanical-ventilation"),
]


@pytest.mark.parametrize(("code", "grade"), DEVICES)
def test_oxygen_device_grade(code: str, grade: int) -> None:
    # With a low flow rate recorded (2 L/min alone is grade 2), the device class decides.
    assert crs(temp(39.0), sbp(120), device(code), flow(2.0)).grade == max(grade, 2)


POSITIVE_PRESSURE = [p for p in DEVICES if p.values[1] == 4]
NEEDS_FLOW = [p for p in DEVICES if p.values[1] in (2, 3)]


@pytest.mark.parametrize(("code", "grade"), POSITIVE_PRESSURE)
def test_positive_pressure_counts_without_flow(code: str, grade: int) -> None:
    assert crs(temp(39.0), sbp(120), device(code)).grade == grade


@pytest.mark.parametrize(("code", "grade"), NEEDS_FLOW)
def test_device_without_flow_is_indeterminate_comfort_oxygen(code: str, grade: int) -> None:
    # clinical-rules.md §1.1: oxygen for comfort is not hypoxia; a device with a flow rate counts.
    result = crs(temp(39.0), sbp(120), device(code))
    assert result.grade is None
    assert result.missing == ("oxygen-flow",)
    assert "comfort" in result.rationale


def test_room_air_alone_is_known() -> None:
    assert crs(temp(39.0), sbp(120), device("none")).grade == 1


def test_uncredited_device_does_not_block_a_higher_known_grade() -> None:
    assert crs(temp(39.0), sbp(120), device("face-mask"), device("bipap", -2)).grade == 4


def test_every_device_is_in_the_table() -> None:
    assert {p.values[0] for p in DEVICES} == set(OXYGEN_DEVICE_GRADE)


def test_worst_oxygen_support_in_window_decides() -> None:
    result = crs(temp(39.0), sbp(120), device("none", -1), device("face-mask", -8), flow(2.0, -3))
    assert result.grade == 3


def test_high_flow_rate_through_a_low_flow_device_is_grade_3() -> None:
    assert crs(temp(39.0), sbp(120), device("low-flow-nasal-cannula"), flow(8.0)).grade == 3


# --- CRS: vasopressors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drugs", "grade"),
    [
        pytest.param((given("norepinephrine", -6),), 3, id="one-norepinephrine"),
        pytest.param((given("phenylephrine", -6),), 3, id="one-phenylephrine"),
        pytest.param((given("dopamine", -6),), 3, id="one-dopamine"),
        pytest.param(
            (given("norepinephrine", -6), given("vasopressin", -4)), 3, id="norepinephrine+vasopressin-not-counted"
        ),
        pytest.param((given("norepinephrine", -6), given("epinephrine", -4)), 4, id="two-overlapping"),
        pytest.param((given("dopamine", -6, -1), given("phenylephrine", -4, -2)), 4, id="two-overlapping-ended"),
        pytest.param(
            (given("norepinephrine", -6), given("epinephrine", -4), given("vasopressin", -3)),
            4,
            id="two-counted+vasopressin",
        ),
        pytest.param((given("norepinephrine", -12, -8), given("epinephrine", -6)), 3, id="two-not-overlapping"),
        pytest.param((given("norepinephrine", -12, -6), given("epinephrine", -6)), 3, id="switch-at-same-minute"),
        pytest.param((given("norepinephrine", -12, -5), given("epinephrine", -6)), 4, id="one-hour-overlap"),
        pytest.param(
            (given("norepinephrine", -30, -20), given("epinephrine", -10)), 3, id="two-in-window-not-overlapping"
        ),
        pytest.param((given("norepinephrine", -8, -4), given("norepinephrine", -6)), 3, id="same-agent-twice-is-one"),
        pytest.param((given("norepinephrine", -72),), 3, id="ongoing-started-3-days-ago"),
        pytest.param((given("norepinephrine", -30, -20),), 3, id="ended-inside-window"),
        pytest.param((given("norepinephrine", -30, -24),), 3, id="ended-exactly-at-window-start"),
        pytest.param((given("norepinephrine", -30, -25),), 1, id="ended-before-window"),
        pytest.param((given("norepinephrine", 1),), 1, id="starts-after-at"),
        pytest.param((given("norepinephrine", -6, rate=0.0),), 1, id="rate-0-not-counted"),
        pytest.param((given("norepinephrine", -6, rate=0.05),), 3, id="rate-positive-counted"),
        pytest.param(
            (given("norepinephrine", -6, rate=0.0), given("epinephrine", -6, rate=2.0)), 3, id="one-at-rate-0"
        ),
        pytest.param((given("vasopressin", -6),), 1, id="vasopressin-alone-is-no-pressor"),
    ],
)
def test_vasopressors(drugs: tuple[Administration, ...], grade: int) -> None:
    # Fever, normal pressure and room air: the pressors alone decide above grade 1.
    result = crs(temp(39.0), sbp(120), device("none"), *drugs)
    assert result.grade == grade


def test_vasopressin_alone_is_graded_on_bp_and_says_not_counted() -> None:
    result = crs(temp(39.0), sbp(85), device("none"), given("vasopressin", -6))
    assert result.grade == 2  # hypotension not requiring (counted) vasopressors
    assert "not counted" in result.rationale
    assert "Vasopressin" in result.rationale


def test_vasopressin_with_one_pressor_says_not_counted() -> None:
    result = crs(temp(39.0), device("none"), given("norepinephrine", -6), given("vasopressin", -4))
    assert result.grade == 3
    assert "not counted" in result.rationale


def test_two_pressors_basis_holds_both() -> None:
    ne, epi = given("norepinephrine", -6), given("epinephrine", -4)
    result = crs(temp(39.0), device("none"), ne, epi)
    assert result.grade == 4
    assert {ne.ref, epi.ref} <= set(result.basis)
    assert "norepinephrine and epinephrine" in result.rationale


def test_pressor_ignores_bp_reading() -> None:
    # On a vasopressor, a normal pressure is a treated pressure: still grade 3.
    assert crs(temp(39.0), sbp(130), device("none"), given("norepinephrine", -6)).grade == 3


# --- CRS: masked fever (antipyretic / anti-cytokine therapy) -----------------------------

DAY0 = -72.0  # CAR T infusion 3 days before AT
FEVER_DAY1 = -48.0  # day 1, outside the 24 h window


def masked_case(drug: Administration, *, fever_at: float = FEVER_DAY1) -> GradeResult:
    return crs(
        bolus("cart-infusion", DAY0),
        temp(39.2, fever_at),
        drug,
        temp(37.0, -2),  # afebrile now
        sbp(100),
        device("none"),
        given("norepinephrine", -6),
    )


@pytest.mark.parametrize("drug", ["tocilizumab", "acetaminophen", "dexamethasone", "methylprednisolone", "anakinra"])
def test_masked_fever_grades_on_hypotension(drug: str) -> None:
    dose = bolus(drug, FEVER_DAY1 + 2)
    result = masked_case(dose)
    assert result.grade == 3
    assert "masked" in result.rationale
    assert drug in result.rationale
    assert dose.ref in result.basis  # the masking drug decides that fever is not required


def test_masking_drug_before_the_fever_does_not_mask() -> None:
    result = masked_case(bolus("tocilizumab", FEVER_DAY1 - 2))
    assert result.grade == 0
    assert "no masking therapy" in result.rationale


def test_fever_before_day_0_is_not_a_crs_fever() -> None:
    result = masked_case(bolus("tocilizumab", DAY0 + 2), fever_at=DAY0 - 10)
    assert result.grade == 0


def test_masking_drug_after_at_does_not_mask() -> None:
    assert masked_case(bolus("tocilizumab", 1)).grade == 0


def test_masked_fever_needs_no_temperature_in_window() -> None:
    result = crs(
        bolus("cart-infusion", DAY0),
        temp(39.2, FEVER_DAY1),
        bolus("dexamethasone", FEVER_DAY1 + 1),
        sbp(120),
        device("high-flow-nasal-cannula"),
        flow(30.0),
    )
    assert result.grade == 3
    assert result.missing == ()


def test_masked_fever_basis_holds_original_fever() -> None:
    fever = temp(39.2, FEVER_DAY1)
    result = crs(bolus("cart-infusion", DAY0), fever, bolus("tocilizumab", -40), temp(36.8), device("none"), sbp(85))
    assert result.grade == 2
    assert fever.ref in result.basis


# --- CRS: published examples (clinical-rules.md §1.1) --------------------------------------


def test_example_fever_one_pressor_low_flow_is_crs_3() -> None:
    fever, ne, nc = temp(39.5), given("norepinephrine", -5), device("low-flow-nasal-cannula")
    result = crs(fever, ne, nc, sbp(95))
    assert result.grade == 3
    assert fever.ref in result.basis
    assert ne.ref in result.basis
    assert nc.ref not in result.basis  # grade 2 hypoxia did not decide


@pytest.mark.parametrize(
    "items",
    [
        pytest.param((sbp(120), device("none")), id="grade-1"),
        pytest.param((sbp(85), device("none")), id="grade-2-hypotension"),
        pytest.param((sbp(120), device("blow-by"), flow(1.0)), id="grade-2-hypoxia"),
        pytest.param((given("norepinephrine", -3), device("none")), id="grade-3"),
        pytest.param((given("norepinephrine", -3), given("dopamine", -2)), id="grade-4"),
        pytest.param((device("mechanical-ventilation"),), id="grade-4-ventilated"),
    ],
)
def test_fever_ref_in_basis_of_every_crs_grade(items: tuple[Sample | Administration, ...]) -> None:
    fever = temp(38.4)
    result = crs(fever, *items)
    assert result.grade is not None and result.grade >= 1
    assert fever.ref in result.basis


def test_crs_rationale_states_attribution_limit() -> None:
    assert "Attribution" in crs(temp(39.0), *normal()).rationale


# --- ICANS (adults and children over 12): ICE --------------------------------------------


@pytest.mark.parametrize(
    ("score", "grade"),
    [
        pytest.param(10, 0, id="ice-10"),
        pytest.param(9, 1, id="ice-9"),
        pytest.param(7, 1, id="ice-7"),
        pytest.param(6, 2, id="ice-6"),
        pytest.param(3, 2, id="ice-3"),
        pytest.param(2, 3, id="ice-2"),
        pytest.param(0, 3, id="ice-0-awake"),
    ],
)
def test_ice_bands(score: int, grade: int) -> None:
    result = icans(ice(score))
    assert result.grade == grade
    assert result.missing == ()


def test_worst_ice_in_window_decides() -> None:
    assert icans(ice(5, -10), ice(10, -1)).grade == 2
    assert icans(ice(2, -25), ice(9, -1)).grade == 1  # ICE 2 is outside the window


@pytest.mark.parametrize(("level", "grade"), list(CONSCIOUSNESS_GRADE.items()))
def test_consciousness(level: str, grade: int) -> None:
    assert icans(ice(10), finding("consciousness", level)).grade == grade


def test_consciousness_table() -> None:
    assert CONSCIOUSNESS_GRADE == {
        "alert": 0,
        "awakens-spontaneously": 1,
        "awakens-to-voice": 2,
        "awakens-to-tactile": 3,
        "unarousable": 4,
    }


@pytest.mark.parametrize(
    ("concept", "code", "grade"),
    [
        pytest.param("seizure", "none", 0, id="seizure-none"),
        pytest.param("seizure", "rapidly-resolving", 3, id="seizure-rapidly-resolving"),
        pytest.param("seizure", "prolonged", 4, id="seizure-prolonged"),
        pytest.param("motor-weakness", "none", 0, id="motor-none"),
        pytest.param("motor-weakness", "deep-focal", 4, id="motor-deep-focal"),
        pytest.param("cerebral-edema", "none", 0, id="edema-none"),
        pytest.param("cerebral-edema", "focal", 3, id="edema-focal"),
        pytest.param("cerebral-edema", "diffuse", 4, id="edema-diffuse"),
    ],
)
def test_findings(concept: str, code: str, grade: int) -> None:
    table = {"seizure": SEIZURE_GRADE, "motor-weakness": MOTOR_GRADE, "cerebral-edema": EDEMA_GRADE}[concept]
    assert table[code] == grade
    assert icans(ice(10), finding(concept, code)).grade == grade


@pytest.mark.parametrize(
    ("items", "grade"),
    [
        pytest.param(
            (ice(8), finding("consciousness", "awakens-to-voice"), finding("cerebral-edema", "focal")),
            3,
            id="edema-3-beats-ice-1-and-voice-2",
        ),
        pytest.param((ice(5), finding("consciousness", "awakens-spontaneously")), 2, id="ice-2-beats-conscious-1"),
        pytest.param((ice(9), finding("motor-weakness", "deep-focal")), 4, id="motor-4-beats-ice-1"),
        pytest.param(
            (ice(6), finding("seizure", "none", -3), finding("seizure", "rapidly-resolving", -10)),
            3,
            id="worst-seizure-in-window",
        ),
        pytest.param((ice(9), finding("seizure", "prolonged", -25)), 1, id="seizure-before-window"),
    ],
)
def test_worst_domain_wins(items: tuple[Sample, ...], grade: int) -> None:
    assert icans(*items).grade == grade


def test_no_ice_and_no_consciousness_is_indeterminate() -> None:
    result = icans()
    assert result.grade is None
    assert result.missing == ("ice-score", "consciousness")


def test_rapid_seizure_without_ice_is_indeterminate_with_floor() -> None:
    result = icans(finding("seizure", "rapidly-resolving"))
    assert result.grade is None
    # ICE could give at most 3, which the seizure already gives: only consciousness matters.
    assert set(result.missing) == {"consciousness"}
    assert "at least grade 3" in result.rationale


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(finding("seizure", "prolonged"), id="prolonged-seizure"),
        pytest.param(finding("motor-weakness", "deep-focal"), id="deep-focal-motor"),
        pytest.param(finding("cerebral-edema", "diffuse"), id="diffuse-edema"),
        pytest.param(finding("consciousness", "unarousable"), id="unarousable"),
    ],
)
def test_grade_4_finding_alone_is_determinate(item: Sample) -> None:
    result = icans(item)
    assert result.grade == 4
    assert result.missing == ()
    assert item.ref in result.basis


@pytest.mark.parametrize(
    ("level", "grade"),
    [
        pytest.param("alert", None, id="alert-ice-could-be-0-9"),
        pytest.param("awakens-spontaneously", None, id="spontaneously"),
        pytest.param("awakens-to-voice", None, id="voice"),
        pytest.param("awakens-to-tactile", 3, id="tactile-ice-cannot-raise-3"),
        pytest.param("unarousable", 4, id="unarousable"),
    ],
)
def test_consciousness_without_ice(level: str, grade: int | None) -> None:
    # An unrecorded ICE can still raise the grade up to 3 (ICE 0-2): indeterminate, never 0,
    # unless the level of consciousness already reaches grade 3.
    result = icans(finding("consciousness", level))
    assert result.grade == grade
    if grade is None:
        assert result.missing == ("ice-score",)


# --- ICANS: published examples -----------------------------------------------------------


def test_example_ice_3_and_rapid_seizure_is_icans_3() -> None:
    seizure = finding("seizure", "rapidly-resolving")
    result = icans(ice(3), seizure)
    assert result.grade == 3
    assert seizure.ref in result.basis


def test_example_ice_0_unarousable_is_icans_4() -> None:
    level = finding("consciousness", "unarousable")
    result = icans(ice(0), level)
    assert result.grade == 4
    assert level.ref in result.basis


def test_example_ice_0_awake_is_icans_3() -> None:
    score = ice(0)
    result = icans(score)  # no consciousness observation: the ICE assessment stands for it
    assert result.grade == 3
    assert score.ref in result.basis
    assert "Consciousness not recorded" in result.rationale


def test_tremor_is_not_an_icans_domain() -> None:
    # Tremor and myoclonus are CTCAE-graded and must not change ICANS (known mistake).
    assert icans(ice(10), obs("tremor", code="severe")).grade == 0


# --- ICANS: children, CAPD ---------------------------------------------------------------

CHILD = born_years_ago(5, 180)


@pytest.mark.parametrize(
    ("items", "grade"),
    [
        pytest.param((capd(0),), 0, id="capd-0"),
        # CAPD 1-8 without a consciousness level: grade 1 or 2, so indeterminate.
        pytest.param((capd(1),), None, id="capd-1-consciousness-missing"),
        pytest.param((capd(8),), None, id="capd-8-consciousness-missing"),
        pytest.param((capd(1), finding("consciousness", "alert")), 1, id="capd-1+alert"),
        pytest.param((capd(9),), 3, id="capd-9-positive"),
        pytest.param((capd(32),), 3, id="capd-32"),
        pytest.param((capd(8), finding("consciousness", "awakens-spontaneously")), 1, id="capd-8+spontaneously"),
        pytest.param((capd(8), finding("consciousness", "awakens-to-voice")), 2, id="capd-8+voice"),
        pytest.param((capd(3), finding("consciousness", "awakens-to-tactile")), 3, id="capd-3+tactile"),
        pytest.param((capd(3), finding("consciousness", "unarousable")), 4, id="capd-3+unarousable"),
        pytest.param((capd(3), finding("cerebral-edema", "focal")), 3, id="capd-3+focal-edema-decides"),
    ],
)
def test_capd(items: tuple[Sample, ...], grade: int) -> None:
    result = icans(*items, birth=CHILD)
    assert result.grade == grade
    assert "CAPD" in result.rationale


def test_child_with_ice_only_is_indeterminate_naming_capd() -> None:
    result = icans(ice(10), birth=CHILD)
    assert result.grade is None
    assert "capd-score" in result.missing


@pytest.mark.parametrize(
    ("birth", "cfg", "tool", "grade"),
    [
        pytest.param(born_years_ago(12), CFG, "CAPD", 3, id="12th-birthday-capd"),
        pytest.param(born_years_ago(12, 364), CFG, "CAPD", 3, id="age-12-last-day-capd"),
        pytest.param(born_years_ago(13, -1), CFG, "CAPD", 3, id="day-before-13th-birthday-capd"),
        pytest.param(born_years_ago(13), CFG, "ICE", 0, id="13th-birthday-ice"),
        pytest.param(born_years_ago(13, 1), CFG, "ICE", 0, id="age-13-ice"),
        pytest.param(born_years_ago(12), GradingConfig(capd_max_age_years=11), "ICE", 0, id="max-11-age-12-ice"),
        pytest.param(born_years_ago(11), GradingConfig(capd_max_age_years=11), "CAPD", 3, id="max-11-age-11-capd"),
        pytest.param(born_years_ago(13), GradingConfig(capd_max_age_years=13), "CAPD", 3, id="max-13-age-13-capd"),
    ],
)
def test_capd_age_boundary(birth: date, cfg: GradingConfig, tool: str, grade: int) -> None:
    # CAPD 9 (grade 3) and ICE 10 (grade 0) both recorded: the age picks the tool.
    result = icans(capd(9), ice(10), birth=birth, cfg=cfg)
    assert result.grade == grade
    assert f"{tool} (age" in result.rationale
    assert f"{cfg.capd_max_age_years}, configurable" in result.rationale


@pytest.mark.parametrize(
    ("items", "grade", "tool"),
    [
        pytest.param((capd(9),), 3, "CAPD", id="capd-only"),
        pytest.param((ice(9),), 1, "ICE", id="ice-only"),
        pytest.param((ice(10), capd(9)), 0, "ICE", id="both-ice-preferred"),
    ],
)
def test_age_unknown_uses_the_tool_recorded(items: tuple[Sample, ...], grade: int, tool: str) -> None:
    result = icans(*items, birth=None)
    assert result.grade == grade
    assert f"{tool} used as recorded" in result.rationale


def test_masked_fever_without_hypotension_or_hypoxia_is_grade_0() -> None:
    # ASTCT: after masking therapy the grade is driven by hypotension and hypoxia; a masked
    # patient with neither is not held at grade 1 indefinitely.
    result = crs(
        bolus("cart-infusion", DAY0),
        temp(39.2, FEVER_DAY1),
        bolus("tocilizumab", -40),
        temp(36.8),
        sbp(120),
        device("none"),
    )
    assert result.grade == 0
    assert "masked" in result.rationale
