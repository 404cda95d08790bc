"""Grading configuration: what no scale fixes by itself (the hypotension rule without a
vasopressor, high-dose vasopressors, FiO2 from flow, organ-toxicity limits) and the window."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from .concepts import C

VASOPRESSIN = C.VASOPRESSIN


@dataclass(frozen=True)
class HighDoseRule:
    """ "High-dose vasopressors" (Lee 2014 Table 2, as transcribed in clinical-rules.md §2).

    Not verified against the paper (docs/scale-sources.md §1), so there is no default: a site
    enters the values it has read. Thresholds are >=; doses in each agent's canonical unit.
    Norepinephrine equivalent = NE + dopamine / dopamine_divisor + epinephrine + phenylephrine
    / phenylephrine_divisor (ug/min; dopamine in ug/kg/min).
    """

    norepinephrine_ug_min: float
    dopamine_ug_kg_min: float
    phenylephrine_ug_min: float
    epinephrine_ug_min: float
    with_vasopressin_ne_eq_ug_min: float
    combination_ne_eq_ug_min: float
    dopamine_divisor: float
    phenylephrine_divisor: float
    sustained_hours: float

    def ne_equivalent(self, rates: dict[str, float]) -> float:
        return (
            rates.get(C.NOREPINEPHRINE, 0.0)
            + rates.get(C.DOPAMINE, 0.0) / self.dopamine_divisor
            + rates.get(C.EPINEPHRINE, 0.0)
            + rates.get(C.PHENYLEPHRINE, 0.0) / self.phenylephrine_divisor
        )

    def is_high(self, rates: dict[str, float]) -> tuple[bool, str]:
        """Whether the agents running at one moment (agent -> rate) are high-dose, and why."""
        agents = [a for a in rates if a != VASOPRESSIN]
        if not agents:
            return False, "vasopressin alone (no high-dose rule for it)"
        ne_eq = self.ne_equivalent(rates)
        if VASOPRESSIN in rates:
            limit, rule = self.with_vasopressin_ne_eq_ug_min, "with vasopressin: norepinephrine equivalent"
            return ne_eq >= limit, f"{rule} {ne_eq:g} ug/min (high-dose >= {limit:g})"
        if len(agents) > 1:
            limit = self.combination_ne_eq_ug_min
            return ne_eq >= limit, f"combination: norepinephrine equivalent {ne_eq:g} ug/min (high-dose >= {limit:g})"
        agent = agents[0]
        limits: dict[str, tuple[float, str]] = {
            C.NOREPINEPHRINE: (self.norepinephrine_ug_min, "ug/min"),
            C.DOPAMINE: (self.dopamine_ug_kg_min, "ug/kg/min"),
            C.PHENYLEPHRINE: (self.phenylephrine_ug_min, "ug/min"),
            C.EPINEPHRINE: (self.epinephrine_ug_min, "ug/min"),
        }
        limit, unit = limits[agent]
        return rates[agent] >= limit, f"{agent} alone {rates[agent]:g} {unit} (high-dose >= {limit:g})"


# FiO2 (%) estimated from oxygen flow (L/min) where no FiO2 is charted: revised Atlanta
# classification, modified Marshall score (Banks PA et al., Gut 2013;62:102-111): room air 21%,
# 2 L/min 25%, 4 L/min 30%, 6-8 L/min 40%, 9-10 L/min 50%. It names no device; it is applied to
# low-flow nasal cannula and to a flow with no device recorded. Between two points the FiO2 is
# only known to lie between their values; above the last point it is at least the last value.
ATLANTA_FIO2_POINTS: tuple[tuple[float, float], ...] = (
    (0.0, 21.0),
    (2.0, 25.0),
    (4.0, 30.0),
    (6.0, 40.0),
    (8.0, 40.0),
    (9.0, 50.0),
    (10.0, 50.0),
)
ATLANTA_SOURCE = "revised Atlanta / modified Marshall table, Banks 2013"
FIO2_ESTIMATE_DEVICES = frozenset({"low-flow-nasal-cannula"})


@dataclass(frozen=True)
class OlderConfig:
    high_dose: HighDoseRule | None = None
    fio2_points: tuple[tuple[float, float], ...] = ATLANTA_FIO2_POINTS  # () disables the estimate
    ctcae_organ_version: str = "5.0"  # "5.0" or "4.03"
    # Upper limits of normal when an Observation carries no referenceRange (no default: lab-specific).
    uln_creatinine_mg_dl: float | None = None
    uln_ast_u_l: float | None = None
    uln_alt_u_l: float | None = None
    # Organ-toxicity baseline: the latest value in this period before lymphodepletion starts.
    baseline_lookback: timedelta = timedelta(hours=72)
    # High-dose runs and vasopressor duration look back this far before the window.
    pressor_lookback: timedelta = timedelta(hours=72)


# Pediatric hypotension (ASTCT sets no number): systolic limits of the AHA Pediatric
# Advanced Life Support (PALS/ATLS) definition of hypotension, as compared in
# J Trauma Acute Care Surg 2019;86:448-453 (doi:10.1097/TA.0000000000002139): < 60 mmHg term neonates (0-28 d),
# < 70 infants (1-12 mo), < 70 + 2 x age in years (1-10 y), < 90 from 10 y.
PALS_NEONATE_DAYS = 28


def pals_sbp_below_mmhg(age_days: int, age_years: int | None = None) -> float:
    if age_days <= PALS_NEONATE_DAYS:
        return 60.0
    # Age in completed years (a birthday on the day counts); days / 365.25 only as fallback.
    years = age_years if age_years is not None else int(age_days / 365.25)
    if years < 1:
        return 70.0
    if years < 10:
        return 70.0 + 2 * years
    return 90.0


@dataclass(frozen=True)
class HypotensionRule:
    """The explicit hypotension-without-vasopressor rule; ASTCT gives no number."""

    adult_sbp_below_mmhg: float = 90.0
    adult_map_below_mmhg: float = 65.0
    adult_from_age_years: int = 18

    def limits(self, age_days: int | None, age_years: int | None = None) -> tuple[float, float | None, str]:
        """(systolic limit, MAP limit or None, wording) for the patient's age."""
        child = age_days is not None and (
            age_years < self.adult_from_age_years
            if age_years is not None
            else age_days < self.adult_from_age_years * 365.25
        )
        if age_days is not None and child:
            sbp = pals_sbp_below_mmhg(age_days, age_years)
            return sbp, None, f"systolic < {sbp:g} mmHg (PALS limit for age; configurable)"
        text = (
            f"systolic < {self.adult_sbp_below_mmhg:g} mmHg or MAP < {self.adult_map_below_mmhg:g} mmHg "
            "(adult rule; configurable, ASTCT sets no number)"
        )
        if age_days is None:
            text += "; age unknown, adult rule used"
        return self.adult_sbp_below_mmhg, self.adult_map_below_mmhg, text


@dataclass(frozen=True)
class GradingConfig:
    window: timedelta = timedelta(hours=24)
    capd_max_age_years: int = 12
    hypotension: HypotensionRule = HypotensionRule()
    older: OlderConfig = field(default_factory=OlderConfig)  # the older CRS scales (service/core/older.py)
    # Site setting (off by default): SpO2 charted in the window with no oxygen device, flow or
    # FiO2 charted reads as room air, and the rationale says "room air assumed (site setting)".
    room_air_when_spo2_only: bool = False
