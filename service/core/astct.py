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

from datetime import datetime

from .concepts import C
from .config import VASOPRESSIN, GradingConfig
from .config import HypotensionRule as HypotensionRule
from .facts import (
    CRS_CONCEPTS,
    OXYGEN_DEVICES,
    VASOPRESSIN_NOTE,
    VASOPRESSORS_COUNTED,
    Facts,
    facts_at,
    room_air_note,
)
from .facts import FEVER_C as FEVER_C  # re-exported: the fever rule is a fact every CRS scale reads
from .grading import MAX_GRADE, Domain, band, combine, crs_notes, fever_gate, ignored_note, no_crs
from .model import GradeResult, PatientData, Sample, completed_years, window_text
from .model import fmt_time as _fmt_t

CRS_METHOD = "astct-crs"
ICANS_METHOD = "astct-icans"
CRS_SCALE = "ASTCT 2019 CRS consensus grading (Lee DW et al., BBMT 2019;25:625-638)"
ICANS_SCALE = "ASTCT 2019 ICANS consensus grading (Lee DW et al., BBMT 2019;25:625-638)"

# --- CRS (table "ASTCT CRS Consensus Grading") ---------------------------------------

# Fever: "Temperature >= 38 °C" (facts.FEVER_C), grade 1; a masked fever (facts.FEVER_MASKING_DRUGS)
# is no longer required (table footnote).
# Hypoxia: "low-flow nasal cannula (<= 6 L/min) or blow-by" is grade 2; "high-flow nasal
# cannula (> 6 L/min), facemask, nonrebreather mask, or Venturi mask" grade 3; "positive
# pressure (CPAP, BiPAP, intubation and mechanical ventilation)" grade 4.
HIGH_FLOW_ABOVE_L_MIN = 6.0
# Oxygen flow (L/min) without a higher-graded device: (flow above, grade), first row that holds.
OXYGEN_FLOW_GRADE: tuple[tuple[float, int], ...] = ((HIGH_FLOW_ABOVE_L_MIN, 3), (0.0, 2))
OXYGEN_DEVICE_GRADE: dict[str, int] = {  # one row per facts.OXYGEN_DEVICES value
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
# multiple vasopressors (excluding vasopressin)" grade 4. Vasopressin never counts
# (facts.VASOPRESSORS_COUNTED).
ONE_VASOPRESSOR_GRADE = 3
MULTIPLE_VASOPRESSORS_GRADE = 4
HYPOTENSION_NO_PRESSOR_GRADE = 2

assert tuple(OXYGEN_DEVICE_GRADE) == OXYGEN_DEVICES

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
    (C.CONSCIOUSNESS, CONSCIOUSNESS_GRADE),
    (C.SEIZURE, SEIZURE_GRADE),
    (C.MOTOR_WEAKNESS, MOTOR_GRADE),
    (C.CEREBRAL_EDEMA, EDEMA_GRADE),
)


# --- helpers -------------------------------------------------------------------------

ICANS_CONCEPTS = frozenset({C.ICE_SCORE, C.CAPD_SCORE, *(c for c, _ in CODED_ICANS_DOMAINS)})


def _worst_coded(series: list[Sample], table: dict[str, int]) -> tuple[int, Sample] | None:
    best: tuple[int, Sample] | None = None
    for s in series:
        g = table.get(s.code or "")
        if g is not None and (best is None or g > best[0]):
            best = (g, s)
    return best


# --- CRS -----------------------------------------------------------------------------


def _hypotension(f: Facts) -> Domain:
    p = f.pressors
    vaso_note = VASOPRESSIN_NOTE if p.vasopressin else ""
    if p.together is not None:
        why = f"{p.finding} -> grade {MULTIPLE_VASOPRESSORS_GRADE}{vaso_note}"
        refs = tuple(a.ref for a in p.together)
        return Domain("hypotension", MULTIPLE_VASOPRESSORS_GRADE, why, refs, finding=p.finding)
    if p.counted:
        why = f"{p.finding} -> grade {ONE_VASOPRESSOR_GRADE}{vaso_note}"
        refs = tuple(a.ref for a in p.counted)
        return Domain("hypotension", ONE_VASOPRESSOR_GRADE, why, refs, finding=p.finding)
    bp = f.blood_pressure
    if bp.low:
        why = f"{bp.finding} -> grade {HYPOTENSION_NO_PRESSOR_GRADE}.{vaso_note}"
        refs = tuple(s.ref for s in bp.low[:5])
        return Domain("hypotension", HYPOTENSION_NO_PRESSOR_GRADE, why, refs, finding=bp.finding)
    if bp.measured:
        why = f"no hypotension ({bp.read} pressures; rule: {bp.rule}), no vasopressor.{vaso_note}"
        return Domain("hypotension", 0, why)
    why = f"no blood pressure and no vasopressor recorded.{vaso_note}"
    return Domain("hypotension", None, why, needs="systolic-bp or mean-arterial-pressure")


def _flow_grade(flow_l_min: float) -> int:
    return next((grade for above, grade in OXYGEN_FLOW_GRADE if flow_l_min > above), 0)


def _hypoxia(f: Facts) -> Domain:
    """Oxygen domain. Positive pressure counts on its own; other devices count only with a
    flow rate recorded in the window, because oxygen given for comfort is not hypoxia
    (clinical-rules.md §1.1) and a device alone cannot tell the two apart."""
    devices, flows = f.oxygen.devices, f.oxygen.flows
    if not devices and not flows and f.oxygen.room_air_assumed is not None:
        s = f.oxygen.room_air_assumed
        return Domain("hypoxia", 0, f"no oxygen support ({room_air_note(s)})", (s.ref,))
    if not devices and not flows:
        return Domain("hypoxia", None, "no oxygen device or flow recorded.", needs="oxygen-device or oxygen-flow")
    top_flow = max((s.value or 0.0 for s in flows), default=0.0)
    flowing = top_flow > 0
    # The worst (grade, device or flow), the first of its grade (devices before the flow on a
    # tie, as listed); only it is put in words. One pass: the course asks this every hour.
    best: tuple[int, Sample] | None = None
    worst_uncredited: tuple[int, Sample] | None = None
    for s in devices:
        g = OXYGEN_DEVICE_GRADE[s.code or ""]
        if g in (0, MAX_GRADE) or flowing:
            if best is None or g > best[0]:
                best = (g, s)
        elif worst_uncredited is None or g > worst_uncredited[0]:
            worst_uncredited = (g, s)
    if flows:
        # A higher flow never grades lower (OXYGEN_FLOW_GRADE): the highest flow gives the worst
        # grade, and the first flow of that grade is named.
        g = _flow_grade(top_flow)
        if best is None or g > best[0]:
            best = (g, next(s for s in flows if _flow_grade(s.value or 0.0) == g))
    if worst_uncredited is not None and (best is None or worst_uncredited[0] > best[0]):
        g, s = worst_uncredited
        why = (
            f"oxygen device {s.code} at {_fmt_t(s.t)} without a flow rate in the window: oxygen for comfort "
            "cannot be excluded, so the device alone is not graded"
        )
        return Domain("hypoxia", None, why, needs=C.OXYGEN_FLOW, ceiling=g)
    assert best is not None
    grade, sample = best
    if sample.concept == C.OXYGEN_DEVICE:
        text = f"oxygen device {sample.code} at {_fmt_t(sample.t)}"
    else:
        text = f"oxygen flow {sample.shown} at {_fmt_t(sample.t)} (high flow is > {HIGH_FLOW_ABOVE_L_MIN:g} L/min)"
    if grade:
        return Domain("hypoxia", grade, f"{text} -> grade {grade}", (sample.ref,), finding=text)
    return Domain("hypoxia", grade, f"no oxygen support ({text})", (sample.ref,))


def grade_crs(data: PatientData, at: datetime, cfg: GradingConfig) -> GradeResult:
    return crs_from_facts(facts_at(data, at, cfg))


def crs_from_facts(f: Facts, brief: bool = False) -> GradeResult:
    """ASTCT CRS from the shared per-window facts (`brief`: see grading.combine)."""
    data, lo, at = f.data, f.lo, f.at
    window = f.window_text
    gate = fever_gate(f.fever)
    notes = [] if brief else crs_notes(gate) + ignored_note(data, CRS_CONCEPTS)
    if gate.domain is None:
        return no_crs(CRS_METHOD, CRS_SCALE, at, gate, window, notes, f.crs_findings(brief), brief=brief)
    fever_dom = gate.domain
    hypo = _hypotension(f)
    hypox = _hypoxia(f)
    domains = [fever_dom, hypo, hypox]
    considered: list[str] = []
    if not brief:
        considered = [s.ref for s in gate.temps]
        considered += list(fever_dom.refs) + list(hypo.refs) + list(hypox.refs)
        for c in (C.SYSTOLIC_BP, C.MEAN_ARTERIAL_PRESSURE, C.OXYGEN_DEVICE, C.OXYGEN_FLOW):
            considered += [s.ref for s in data.window(c, lo, at)]
        for c in (*VASOPRESSORS_COUNTED, VASOPRESSIN):
            considered += [a.ref for a in data.given(c) if a.overlaps(lo, at)]
        if gate.day0:
            considered.append(gate.day0.ref)
    return combine(CRS_METHOD, CRS_SCALE, at, domains, window, notes, considered, f.crs_findings(brief), brief=brief)


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


def grade_icans(data: PatientData, at: datetime, cfg: GradingConfig, brief: bool = False) -> GradeResult:
    lo = at - cfg.window
    head = "" if brief else window_text(lo, at)
    notes: list[str] = []
    ice = data.window(C.ICE_SCORE, lo, at)
    capd = data.window(C.CAPD_SCORE, lo, at)
    births = data.birth_dates()
    ages = sorted({completed_years(b, at.date()) for b in births})
    if len({a <= cfg.capd_max_age_years for a in ages}) != 1:
        # No birth date, or a partial one ("2012") whose possible ages fall on both sides of the cut-off.
        use_capd = bool(capd) and not ice
        why = "no Patient.birthDate" if not births else f"partial birthDate: age {ages[0]}-{ages[-1]} y"
        notes.append(f"Age unknown ({why}): {'CAPD' if use_capd else 'ICE'} used as recorded.")
    else:
        years = ages[0]
        use_capd = years <= cfg.capd_max_age_years
        rule = "<=" if use_capd else ">"
        age = f"{ages[0]}-{ages[-1]} y (partial birthDate)" if len(ages) > 1 else f"{years} y"
        notes.append(f"Age {age}: {'CAPD' if use_capd else 'ICE'} (age {rule} {cfg.capd_max_age_years}, configurable).")
    tool = (
        _score_domain("CAPD", C.CAPD_SCORE, capd, CAPD_BANDS, worst_is_low=False)
        if use_capd
        else _score_domain("ICE", C.ICE_SCORE, ice, ICE_BANDS, worst_is_low=True)
    )
    domains = [tool]
    considered = [s.ref for s in (capd if use_capd else ice)]
    conscious_known = False
    for concept, table in CODED_ICANS_DOMAINS:
        series = data.window(concept, lo, at)
        considered += [s.ref for s in series]
        worst = _worst_coded(series, table)
        if worst is None:
            if concept == C.CONSCIOUSNESS:
                domains.append(Domain(concept, None, "not recorded.", needs=concept))
            else:
                # ASTCT rows for seizure, motor and edema are findings: none recorded = none.
                domains.append(Domain(concept, 0, "no finding recorded."))
            continue
        conscious_known |= concept == C.CONSCIOUSNESS
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
    return combine(ICANS_METHOD, ICANS_SCALE, at, domains, head, notes, considered, brief=brief)
