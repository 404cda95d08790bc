"""ASTCT 2019 consensus grading of CRS and ICANS.

Source: Lee DW et al. ASTCT Consensus Grading for Cytokine Release Syndrome and Neurologic
Toxicity Associated with Immune Effector Cells. Biol Blood Marrow Transplant
2019;25:625-638, doi:10.1016/j.bbmt.2018.12.758. Tables: "ASTCT CRS Consensus Grading",
"ASTCT ICANS Consensus Grading for Adults" (with the ICE tool) and "... for Children" (CAPD).

Every threshold lives in the tables below; the functions only look them up. A domain with
no data is unknown (None), never 0: an unknown domain that could raise the grade makes the
result indeterminate (clinical-rules.md rule 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from .config import VASOPRESSIN, OlderConfig
from .grading import MAX_GRADE, Domain, band, combine, ignored_note
from .model import Administration, DomainFinding, GradeResult, PatientData, Sample
from .model import fmt_time as _fmt_t

CRS_METHOD = "astct-crs"
ICANS_METHOD = "astct-icans"
CRS_SCALE = "ASTCT 2019 CRS consensus grading (Lee DW et al., BBMT 2019;25:625-638)"
ICANS_SCALE = "ASTCT 2019 ICANS consensus grading (Lee DW et al., BBMT 2019;25:625-638)"

# --- CRS (table "ASTCT CRS Consensus Grading") ---------------------------------------

FEVER_C = 38.0  # "Temperature >= 38 °C"
# Hypoxia: "low-flow nasal cannula (<= 6 L/min) or blow-by" is grade 2; "high-flow nasal
# cannula (> 6 L/min), facemask, nonrebreather mask, or Venturi mask" grade 3; "positive
# pressure (CPAP, BiPAP, intubation and mechanical ventilation)" grade 4.
HIGH_FLOW_ABOVE_L_MIN = 6.0
OXYGEN_DEVICE_GRADE: dict[str, int] = {
    "none": 0,
    "low-flow-nasal-cannula": 2,
    "blow-by": 2,
    "high-flow-nasal-cannula": 3,
    "face-mask": 3,
    "non-rebreather": 3,
    "venturi": 3,
    "cpap": 4,
    "bipap": 4,
    "mechanical-ventilation": 4,
}
# Hypotension: "requiring a vasopressor with or without vasopressin" grade 3; "requiring
# multiple vasopressors (excluding vasopressin)" grade 4. Vasopressin never counts.
VASOPRESSORS_COUNTED = ("norepinephrine", "epinephrine", "phenylephrine", "dopamine")
ONE_VASOPRESSOR_GRADE = 3
MULTIPLE_VASOPRESSORS_GRADE = 4
HYPOTENSION_NO_PRESSOR_GRADE = 2
# Masked fever (ASTCT CRS table footnote): after antipyretic or anti-cytokine therapy
# (tocilizumab, corticosteroids) fever is no longer required.
FEVER_MASKING_DRUGS = ("tocilizumab", "anakinra", "dexamethasone", "methylprednisolone", "acetaminophen")

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


# --- ICANS (tables "ASTCT ICANS Consensus Grading for Adults/Children") -------------

# (lowest score, highest score, grade). ICE 10 is grade 0; ICE 0 in an awake patient is 3,
# and an unarousable patient is graded 4 by the consciousness row.
ICE_BANDS: tuple[tuple[int, int, int], ...] = ((10, 10, 0), (7, 9, 1), (3, 6, 2), (0, 2, 3))
# CAPD (Traube, Crit Care Med 2014; 0-32): 1-8 grade 1 (grade 2 comes from "awakens to
# voice"), >= 9 grade 3. A score of 0 is no delirium.
CAPD_BANDS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (1, 8, 1), (9, 32, 3))
CONSCIOUSNESS_GRADE = {
    "alert": 0,  # no depressed level of consciousness
    "awakens-spontaneously": 1,
    "awakens-to-voice": 2,
    "awakens-to-tactile": 3,
    "unarousable": 4,
}
SEIZURE_GRADE = {"none": 0, "rapidly-resolving": 3, "prolonged": 4}
MOTOR_GRADE = {"none": 0, "deep-focal": 4}
EDEMA_GRADE = {"none": 0, "focal": 3, "diffuse": 4}
TOOL_MAX_GRADE = max(g for _, _, g in ICE_BANDS + CAPD_BANDS)  # 3
CODED_ICANS_DOMAINS = (
    ("consciousness", CONSCIOUSNESS_GRADE),
    ("seizure", SEIZURE_GRADE),
    ("motor-weakness", MOTOR_GRADE),
    ("cerebral-edema", EDEMA_GRADE),
)


# --- helpers -------------------------------------------------------------------------

CRS_CONCEPTS = frozenset(
    {
        "body-temperature",
        "systolic-bp",
        "mean-arterial-pressure",
        "oxygen-device",
        "oxygen-flow",
        *VASOPRESSORS_COUNTED,
        VASOPRESSIN,
        *FEVER_MASKING_DRUGS,
        "cart-infusion",
    }
)
ICANS_CONCEPTS = frozenset({"ice-score", "capd-score", *(c for c, _ in CODED_ICANS_DOMAINS)})


def age_days(birth: date | None, at: datetime) -> int | None:
    return None if birth is None else (at.date() - birth).days


def completed_years(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _worst_coded(series: list[Sample], table: dict[str, int]) -> tuple[int, Sample] | None:
    best: tuple[int, Sample] | None = None
    for s in series:
        g = table.get(s.code or "")
        if g is not None and (best is None or g > best[0]):
            best = (g, s)
    return best


# --- CRS -----------------------------------------------------------------------------


def _masking(data: PatientData, since: datetime | None, at: datetime) -> tuple[Sample, Administration] | None:
    """The first CRS fever since day 0 followed, before `at`, by a masking drug."""
    temps = data.series("body-temperature")
    if since is not None and temps:
        temps = data.window("body-temperature", since, at)
    first = next((s for s in temps if s.value is not None and s.value >= FEVER_C and s.t <= at), None)
    if first is None:
        return None
    drugs = [a for c in FEVER_MASKING_DRUGS for a in data.given(c) if first.t < a.start <= at]
    return (first, min(drugs, key=lambda a: a.start)) if drugs else None


def pressors_running(data: PatientData, lo: datetime, hi: datetime) -> Domain | None:
    """Vasopressor domain, or None when no counted vasopressor ran in the window."""
    runs = [
        a for c in VASOPRESSORS_COUNTED for a in data.given(c) if a.overlaps(lo, hi) and (a.rate is None or a.rate > 0)
    ]
    if not runs:
        return None
    # "Multiple vasopressors": two different counted agents running at the same time.
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a.concept != b.concept:
                start = max(a.start, b.start, lo)
                end = min(a.end or hi, b.end or hi, hi)
                # Truly concurrent: one ending as the other starts is a switch, not two at once.
                instant = a.start == a.end or b.start == b.end
                if start < end or (instant and start == end):
                    finding = (
                        f"multiple vasopressors ({a.concept} and {b.concept} running together "
                        f"from {_fmt_t(start)}; vasopressin not counted)"
                    )
                    why = f"{finding} -> grade {MULTIPLE_VASOPRESSORS_GRADE}"
                    return Domain("hypotension", MULTIPLE_VASOPRESSORS_GRADE, why, (a.ref, b.ref), finding=finding)
    first = runs[0]
    dose = f" {first.shown}" if first.shown else ""
    finding = f"one vasopressor ({first.concept} from {_fmt_t(first.start)}{dose})"
    why = f"{finding} -> grade {ONE_VASOPRESSOR_GRADE}"
    return Domain("hypotension", ONE_VASOPRESSOR_GRADE, why, tuple(a.ref for a in runs), finding=finding)


def hypotension(data: PatientData, lo: datetime, hi: datetime, cfg: GradingConfig) -> Domain:
    pressors = pressors_running(data, lo, hi)
    vaso = [a for a in data.given(VASOPRESSIN) if a.overlaps(lo, hi)]
    vaso_note = " Vasopressin ran in the window and is not counted as a vasopressor (ASTCT)." if vaso else ""
    if pressors is not None:
        pressors.why += vaso_note
        return pressors
    years = completed_years(data.birth_date, hi.date()) if data.birth_date else None
    sbp_lim, map_lim, rule = cfg.hypotension.limits(age_days(data.birth_date, hi), years)
    sbp = data.window("systolic-bp", lo, hi)
    maps = data.window("mean-arterial-pressure", lo, hi)
    low = [s for s in sbp if s.value is not None and s.value < sbp_lim]
    if map_lim is not None:
        low += [s for s in maps if s.value is not None and s.value < map_lim]
    if low:
        worst = min(low, key=lambda s: s.value or 0.0)
        finding = (
            f"hypotension not requiring vasopressors ({worst.concept} {worst.shown} at {_fmt_t(worst.t)}; rule: {rule})"
        )
        why = f"{finding} -> grade {HYPOTENSION_NO_PRESSOR_GRADE}.{vaso_note}"
        refs = tuple(s.ref for s in low[:5])
        return Domain("hypotension", HYPOTENSION_NO_PRESSOR_GRADE, why, refs, finding=finding)
    if sbp or (maps and map_lim is not None):  # the pediatric rule reads systolic pressure only
        why = f"no hypotension ({len(sbp) + len(maps)} pressures; rule: {rule}), no vasopressor.{vaso_note}"
        return Domain("hypotension", 0, why)
    why = f"no blood pressure and no vasopressor recorded.{vaso_note}"
    return Domain("hypotension", None, why, needs="systolic-bp or mean-arterial-pressure")


def _hypoxia(data: PatientData, lo: datetime, hi: datetime) -> Domain:
    """Oxygen domain. Positive pressure counts on its own; other devices count only with a
    flow rate recorded in the window, because oxygen given for comfort is not hypoxia
    (clinical-rules.md §1.1) and a device alone cannot tell the two apart."""
    devices = [s for s in data.window("oxygen-device", lo, hi) if s.code in OXYGEN_DEVICE_GRADE]
    flows = [s for s in data.window("oxygen-flow", lo, hi) if s.value is not None]
    if not devices and not flows:
        return Domain("hypoxia", None, "no oxygen device or flow recorded.", needs="oxygen-device or oxygen-flow")
    flowing = [s for s in flows if (s.value or 0.0) > 0]
    known: list[tuple[int, Sample, str]] = []
    uncredited: list[tuple[int, Sample]] = []
    for s in devices:
        g = OXYGEN_DEVICE_GRADE[s.code or ""]
        if g in (0, MAX_GRADE) or flowing:
            known.append((g, s, f"oxygen device {s.code} at {_fmt_t(s.t)}"))
        else:
            uncredited.append((g, s))
    for s in flows:
        value = s.value or 0.0
        g = 3 if value > HIGH_FLOW_ABOVE_L_MIN else (2 if value > 0 else 0)
        known.append((g, s, f"oxygen flow {s.shown} at {_fmt_t(s.t)} (high flow is > {HIGH_FLOW_ABOVE_L_MIN:g} L/min)"))
    best = max(known, key=lambda k: k[0], default=None)
    worst_uncredited = max(uncredited, key=lambda u: u[0], default=None)
    if worst_uncredited is not None and (best is None or worst_uncredited[0] > best[0]):
        g, s = worst_uncredited
        why = (
            f"oxygen device {s.code} at {_fmt_t(s.t)} without a flow rate in the window: oxygen for comfort "
            "cannot be excluded, so the device alone is not graded"
        )
        return Domain("hypoxia", None, why, needs="oxygen-flow", ceiling=g)
    assert best is not None
    grade, sample, text = best
    if grade:
        return Domain("hypoxia", grade, f"{text} -> grade {grade}", (sample.ref,), finding=text)
    return Domain("hypoxia", grade, f"no oxygen support ({text})", (sample.ref,))


@dataclass(frozen=True)
class FeverGate:
    """Whether CRS is present in the window (ASTCT: fever >= 38 °C, or a CRS fever since day 0
    masked by antipyretic/anti-cytokine therapy). `domain` is set when present; otherwise
    `grade` is 0 (no fever) or None (no temperature) with `why`."""

    domain: Domain | None
    grade: int | None
    why: str
    temps: tuple[Sample, ...]
    day0: Administration | None


def fever_gate(data: PatientData, lo: datetime, at: datetime) -> FeverGate:
    day0 = data.first_event("cart-infusion")
    since = day0.start if day0 else None
    temps = tuple(data.window("body-temperature", lo, at))
    fever = max(temps, key=lambda s: s.value or 0.0) if temps else None
    if fever is not None and (fever.value or 0.0) >= FEVER_C:
        why = f"fever {fever.shown} at {_fmt_t(fever.t)} (>= {FEVER_C:g} °C)"
        return FeverGate(Domain("fever", 1, why, (fever.ref,), required=True), 1, why, temps, day0)
    masked = _masking(data, since, at)
    if masked is not None:
        f, drug = masked
        why = (
            f"fever masked: CRS fever {f.shown} at {_fmt_t(f.t)} followed by {drug.concept} at "
            f"{_fmt_t(drug.start)}, so fever is no longer required and the grade is driven by hypotension "
            "and hypoxia (ASTCT)."
        )
        return FeverGate(Domain("fever", 0, why, (f.ref, drug.ref), required=True), 0, why, temps, day0)
    if fever is not None:
        why = f"no fever (max {fever.shown} at {_fmt_t(fever.t)}; < {FEVER_C:g} °C) and no masking therapy."
        return FeverGate(None, 0, why, temps, day0)
    why = "no body temperature recorded in the window and no masking therapy after a CRS fever."
    return FeverGate(None, None, why, temps, day0)


def crs_notes(gate: FeverGate) -> list[str]:
    notes = [] if gate.day0 else ["No CAR T infusion (day 0) found: masked fever looked for over all data."]
    notes.append("Attribution to another cause cannot be judged from data; graded as recorded.")
    return notes


def no_crs(method: str, scale: str, at: datetime, gate: FeverGate, head: str, notes: list[str]) -> GradeResult:
    """Grade 0 (no fever) or indeterminate (no temperature): CRS is not established."""
    refs = tuple(s.ref for s in gate.temps)
    verdict = f"{'Grade 0' if gate.grade == 0 else 'Indeterminate'}: {gate.why}"
    needs = "" if gate.grade == 0 else "body-temperature"
    return GradeResult(
        method,
        scale,
        at,
        gate.grade,
        f"{verdict} {head} " + " ".join(notes),
        refs if gate.grade == 0 else (),
        (needs,) if needs else (),
        refs,
        verdict=verdict,
        domains=(DomainFinding("fever", gate.grade, refs, needs),),
    )


def grade_crs(data: PatientData, at: datetime, cfg: GradingConfig) -> GradeResult:
    lo = at - cfg.window
    window = f"Window {_fmt_t(lo)} to {_fmt_t(at)}."
    gate = fever_gate(data, lo, at)
    notes = crs_notes(gate) + ignored_note(data, CRS_CONCEPTS)
    if gate.domain is None:
        return no_crs(CRS_METHOD, CRS_SCALE, at, gate, window, notes)
    fever_dom = gate.domain
    considered = [s.ref for s in gate.temps]
    hypo = hypotension(data, lo, at, cfg)
    hypox = _hypoxia(data, lo, at)
    considered += list(fever_dom.refs) + list(hypo.refs) + list(hypox.refs)
    for c in ("systolic-bp", "mean-arterial-pressure", "oxygen-device", "oxygen-flow"):
        considered += [s.ref for s in data.window(c, lo, at)]
    for c in (*VASOPRESSORS_COUNTED, VASOPRESSIN):
        considered += [a.ref for a in data.given(c) if a.overlaps(lo, at)]
    if gate.day0:
        considered.append(gate.day0.ref)
    return combine(CRS_METHOD, CRS_SCALE, at, [fever_dom, hypo, hypox], window, notes, considered)


# --- ICANS ---------------------------------------------------------------------------


def _score_domain(
    name: str, concept: str, series: list[Sample], bands: tuple[tuple[int, int, int], ...], worst_is_low: bool
) -> Domain:
    scored = [s for s in series if s.value is not None]
    if not scored:
        # ICE/CAPD alone give at most grade 3 (ICE 0 unarousable is the consciousness row).
        return Domain(name, None, "not recorded.", needs=concept, ceiling=TOOL_MAX_GRADE)
    pick = min if worst_is_low else max
    worst = pick(scored, key=lambda s: s.value or 0.0)
    grade = band(worst.value or 0.0, bands)
    finding = f"worst {name} {worst.shown} at {_fmt_t(worst.t)}"
    return Domain(name, grade, f"{finding} -> grade {grade}", (worst.ref,), finding=finding)


def grade_icans(data: PatientData, at: datetime, cfg: GradingConfig) -> GradeResult:
    lo = at - cfg.window
    head = f"Window {_fmt_t(lo)} to {_fmt_t(at)}."
    notes: list[str] = []
    ice = data.window("ice-score", lo, at)
    capd = data.window("capd-score", lo, at)
    if data.birth_date is None:
        use_capd = bool(capd) and not ice
        notes.append(f"Age unknown (no Patient.birthDate): {'CAPD' if use_capd else 'ICE'} used as recorded.")
    else:
        years = completed_years(data.birth_date, at.date())
        use_capd = years <= cfg.capd_max_age_years
        rule = "<=" if use_capd else ">"
        notes.append(
            f"Age {years} y: {'CAPD' if use_capd else 'ICE'} (age {rule} {cfg.capd_max_age_years}, configurable)."
        )
    tool = (
        _score_domain("CAPD", "capd-score", capd, CAPD_BANDS, worst_is_low=False)
        if use_capd
        else _score_domain("ICE", "ice-score", ice, ICE_BANDS, worst_is_low=True)
    )
    domains = [tool]
    considered = [s.ref for s in (capd if use_capd else ice)]
    conscious_known = False
    for concept, table in CODED_ICANS_DOMAINS:
        series = data.window(concept, lo, at)
        considered += [s.ref for s in series]
        worst = _worst_coded(series, table)
        if worst is None:
            if concept == "consciousness":
                domains.append(Domain(concept, None, "not recorded.", needs=concept))
            else:
                # ASTCT rows for seizure, motor and edema are findings: none recorded = none.
                domains.append(Domain(concept, 0, "no finding recorded."))
            continue
        conscious_known |= concept == "consciousness"
        g, s = worst
        finding = f"{s.code} at {_fmt_t(s.t)}"
        domains.append(Domain(concept, g, f"{finding} -> grade {g}", (s.ref,), finding=finding))
    if tool.grade is not None and not conscious_known:
        if use_capd and tool.grade == CAPD_BANDS[1][2]:
            # ASTCT pediatric table: CAPD 1-8 is grade 1 if the child awakens spontaneously
            # and grade 2 if only to voice, so the unrecorded consciousness still matters.
            for d in domains:
                if d.name == "consciousness":
                    d.ceiling = 2
                    d.why = "not recorded; with CAPD 1-8 it decides between grade 1 and 2."
        else:
            # A completed ICE (or CAPD 0 / >= 9) assessment implies the patient could be assessed.
            domains = [d for d in domains if d.name != "consciousness"]
            notes.append("Consciousness not recorded; the ICE/CAPD assessment stands for it.")
    notes.append("Sedation and other causes of depressed consciousness cannot be excluded from data.")
    notes += ignored_note(data, ICANS_CONCEPTS)
    return combine(ICANS_METHOD, ICANS_SCALE, at, domains, head, notes, considered)
