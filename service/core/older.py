"""The older CRS scales (and CARTOX CRES) side by side with ASTCT, from the same data.

Sources and their verification status: docs/scale-sources.md (clinical-rules.md §2).
- lee2014-crs: Lee DW et al., Blood 2014;124:188-195 (NCI consensus), wording as in seed 002
  Table 2 and the reviews quoted in scale-sources §1 (grade 3 oxygen is >= 40%; seed 002's
  "< 40%" in that cell is a typo).
- penn-crs: UPENN/CHOP, Porter 2015 / J Hematol Oncol 2018;11:35, the 2015/2016 wording of
  seed 002 Table 2 (scale-sources §2).
- mskcc-crs: Park JH et al., NEJM 2018;378:449 (scale-sources §3).
- cartox-crs / cartox-cres: Neelapu SS et al., Nat Rev Clin Oncol 2018;15:47 (scale-sources §4).
- ctcae4-crs / ctcae5-crs: NCI CTCAE v4.03 (2010) and v5.0 (2017), "Cytokine release
  syndrome" (scale-sources §5, §6).
Organ toxicity (creatinine, AST, ALT increased) is graded by CTCAE (v5.0 by default, v4.03 by
configuration; scale-sources §7).

Every scale reads one set of neutral per-window facts (`facts.Facts`: temperatures, low blood
pressures, vasopressor runs, oxygen support, CTCAE organ grades), computed once per time point
and shared with ASTCT, and maps them to domain grades through the tables below; no scale reads
another scale's grade. What no scale defines
numerically is configuration with no default (high-dose vasopressors: Lee 2014 Table 2 could
not be verified) or a documented, configurable table (FiO2 from oxygen flow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .concepts import C
from .config import GradingConfig
from .facts import ROOM_AIR_FIO2_PCT, VASOPRESSIN_NOTE, Facts, hours_text
from .facts import facts_at as facts_at  # re-exported: the older scales' entry to the facts
from .grading import Domain, band, combine, crs_notes, fever_gate, ignored_items_note, ignored_note, no_crs
from .model import GradeResult, PatientData, window_text
from .model import fmt_time as _fmt_t

# --- scale tables -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    method: str
    name: str
    # Hypotension: grade for hypotension without a vasopressor, one low-dose vasopressor,
    # multiple vasopressors, and high-dose vasopressors (None: the scale has no such row).
    hypotension_no_pressor: int | None
    one_pressor: int
    multiple_pressors: int | None
    high_dose: int | None
    # Oxygen: "fio2" (< 40% / >= 40% FiO2), "any" (any oxygen requirement) or None (not graded).
    oxygen: str | None
    oxygen_lt40: int = 0
    oxygen_ge40: int = 0
    ventilator: int = 4
    # MSKCC: any vasopressor < 24 h / >= 24 h.
    pressor_hours_split: float | None = None
    long_pressor: int = 0
    # CTCAE v4.03: any pressor, vasopressin included, is "pressor support".
    vasopressin_counts: bool = False
    # Organ toxicity: CTCAE grade -> scale grade, for creatinine and for transaminases.
    creatinine: dict[int, int] = field(default_factory=dict)
    transaminase: dict[int, int] = field(default_factory=dict)
    not_evaluable: str = ""
    choices: str = ""


VENTILATOR_READING = (
    "'Ventilator' / 'mechanical ventilation' read as invasive mechanical ventilation; CPAP and BiPAP "
    "are oxygen support graded by FiO2 (iectox choice, docs/older-scales.md)."
)

LEE = Scale(
    "lee2014-crs",
    "Lee 2014 NCI consensus CRS grading (Lee DW et al., Blood 2014;124:188-195)",
    hypotension_no_pressor=2,  # "hypotension responsive to fluids or low dose of one vasopressor"
    one_pressor=2,
    multiple_pressors=3,  # "high-dose or multiple vasopressors"
    high_dose=3,
    oxygen="fio2",
    oxygen_lt40=2,  # "oxygen requirement < 40%"
    oxygen_ge40=3,  # ">= 40%"
    ventilator=4,  # "requirement for ventilator support"
    creatinine={1: 1, 2: 2, 3: 3, 4: 4},  # "grade N organ toxicity"
    transaminase={1: 1, 2: 2, 3: 3, 4: 3},  # "grade 4 transaminitis" is grade 3; grade 4 excludes it
    not_evaluable="symptomatic vs moderate/aggressive intervention beyond oxygen and vasopressors; "
    "organ toxicities other than creatinine, AST and ALT",
    choices=VENTILATOR_READING,
)
PENN = Scale(
    "penn-crs",
    "UPENN/CHOP CRS grading (Porter DL et al., Sci Transl Med 2015 / J Hematol Oncol 2018;11:35)",
    hypotension_no_pressor=None,  # "treated with IV fluids" (grade 3) cannot be seen: named below
    one_pressor=3,  # "hypotension treated with IV fluids or low-dose pressors"
    multiple_pressors=None,  # Penn has no "multiple" row; only "high-dose vasoactives"
    high_dose=4,
    oxygen="any",  # "hypoxemia requiring oxygenation, BiPAP or CPAP" is grade 3
    oxygen_lt40=3,
    oxygen_ge40=3,
    ventilator=4,  # "hypoxemia requiring mechanical ventilation"
    creatinine={1: 2, 2: 2, 3: 3, 4: 3},  # "creatinine <= grade 2" 2; "grade 3 creatinine" 3
    transaminase={1: 2, 2: 2, 3: 2, 4: 3},  # "LFTs <= grade 3" 2; "grade 4 LFTs" 3
    not_evaluable="IV therapies or parenteral nutrition and hospitalisation (grade 2, 3); IV fluids "
    "for hypotension without a vasopressor (grade 3); other life-threatening complications (grade 4)",
    choices="Wording of seed 002 Table 2 (2015/2016). " + VENTILATOR_READING.replace("graded by FiO2", "(grade 3)"),
)
MSKCC = Scale(
    "mskcc-crs",
    "MSKCC CRS grading (Park JH et al., NEJM 2018;378:449-459)",
    hypotension_no_pressor=None,
    one_pressor=2,  # "any vasopressors < 24 h"
    multiple_pressors=None,
    high_dose=4,  # "refractory to high-dose vasopressors", read as a high-dose requirement
    oxygen="fio2",
    oxygen_lt40=2,
    oxygen_ge40=3,
    ventilator=4,
    pressor_hours_split=24.0,
    long_pressor=3,  # "any vasopressors >= 24 h"
    not_evaluable="'refractory' beyond a high-dose requirement",
    choices=VENTILATOR_READING + " Vasopressin counts toward 'any vasopressors' duration.",
)
CARTOX = Scale(
    "cartox-crs",
    "CARTOX CRS grading (Neelapu SS et al., Nat Rev Clin Oncol 2018;15:47-62)",
    hypotension_no_pressor=2,  # "SBP < 90 mmHg responsive to IV fluids"
    one_pressor=2,  # "or one low-dose vasopressor"
    multiple_pressors=3,
    high_dose=3,
    oxygen="fio2",
    oxygen_lt40=2,
    oxygen_ge40=3,
    ventilator=4,
    creatinine={1: 1, 2: 2, 3: 3, 4: 4},
    transaminase={1: 1, 2: 2, 3: 3, 4: 3},  # "grade 4 organ toxicity except grade 4 transaminitis"
    not_evaluable="'life-threatening' hypotension (grade 4); SaO2 > 90% on the FiO2; organ toxicities "
    "other than creatinine, AST and ALT",
    choices=VENTILATOR_READING + " Hypotension uses the configured rule (adult systolic < 90 mmHg, as CARTOX).",
)
CTCAE4 = Scale(
    "ctcae4-crs",
    "CTCAE v4.03 Cytokine release syndrome (NCI, 2010)",
    hypotension_no_pressor=None,
    one_pressor=4,  # "pressor or ventilatory support indicated"
    multiple_pressors=4,
    high_dose=None,
    oxygen=None,
    ventilator=4,
    vasopressin_counts=True,
    not_evaluable="infusion interruption, response to symptomatic treatment, prophylactic medication "
    "(grade 2); prolonged course, recurrence, hospitalisation for sequelae (grade 3)",
    choices=VENTILATOR_READING,
)
CTCAE5 = Scale(
    "ctcae5-crs",
    "CTCAE v5.0 Cytokine release syndrome (NCI, 2017)",
    hypotension_no_pressor=2,  # "hypotension responding to fluids"
    one_pressor=3,  # "hypotension managed with one pressor"
    multiple_pressors=4,  # iectox reading of "life-threatening; urgent intervention indicated"
    high_dose=None,
    oxygen="fio2",
    oxygen_lt40=2,  # "hypoxia responding to < 40% O2"
    oxygen_ge40=3,  # "hypoxia requiring >= 40% O2"
    ventilator=4,  # iectox reading of "urgent intervention indicated"
    not_evaluable="'life-threatening consequences; urgent intervention indicated' beyond multiple "
    "vasopressors and invasive ventilation",
    choices=VENTILATOR_READING + " Multiple vasopressors (vasopressin not counted) read as grade 4.",
)

CRES_METHOD = "cartox-cres"
CRES_SCALE = "CARTOX CRES grading with CARTOX-10 (Neelapu SS et al., Nat Rev Clin Oncol 2018;15:47-62)"
# CARTOX-10 (0-10): 7-9 grade 1 and 3-6 grade 2 (two secondary sources); 0-2 grade 3 as in
# clinical-rules.md §2 (one source says 0-1 but then leaves 2 in no band); 10 is no impairment.
CARTOX10_BANDS: tuple[tuple[int, int, int], ...] = ((10, 10, 0), (7, 9, 1), (3, 6, 2), (0, 2, 3))
CRES_OBTUNDED = frozenset({"unarousable"})  # "obtunded" grade 4, read as unarousable
CRES_UNVERIFIED_ROWS = (C.SEIZURE, C.MOTOR_WEAKNESS, C.CEREBRAL_EDEMA)

# "O2 < 40% / >= 40%" (Lee, MSKCC, CARTOX, CTCAE v5): FiO2 in %; room air is facts.ROOM_AIR_FIO2_PCT.
FIO2_THRESHOLD_PCT = 40.0


# --- grading ------------------------------------------------------------------------------


def _no_pressor_domain(sc: Scale, f: Facts) -> Domain:
    """Hypotension with no vasopressor running: the configured blood-pressure rule."""
    bp = f.blood_pressure
    vaso_note = VASOPRESSIN_NOTE if f.pressors.vasopressin else ""
    if bp.low:
        refs = tuple(s.ref for s in bp.low[:5])
        if sc.hypotension_no_pressor is None:
            why = f"{bp.finding}: this scale's hypotension rows need a vasopressor (or IV fluids, not read)"
            return Domain("hypotension", 0, why, refs)
        g = sc.hypotension_no_pressor
        return Domain("hypotension", g, f"{bp.finding} -> grade {g}.{vaso_note}", refs, finding=bp.finding)
    if bp.measured:
        why = f"no hypotension ({bp.read} pressures; rule: {bp.rule}), no vasopressor.{vaso_note}"
        return Domain("hypotension", 0, why, ceiling=sc.hypotension_no_pressor or 0)
    if sc.hypotension_no_pressor is None:
        return Domain("hypotension", 0, "no vasopressor recorded (blood pressure alone is not graded here)")
    why = f"no blood pressure and no vasopressor recorded.{vaso_note}"
    needs = "systolic-bp or mean-arterial-pressure"
    return Domain("hypotension", None, why, needs=needs, ceiling=sc.hypotension_no_pressor)


def _hypotension_domain(sc: Scale, f: Facts) -> Domain:
    p = f.pressors
    if not p.any_refs:
        return _no_pressor_domain(sc, f)
    if p.vasopressin_only and not sc.vasopressin_counts and sc.pressor_hours_split is None:
        # MSKCC's "any vasopressors" duration counts vasopressin; the others do not grade it alone.
        return Domain("hypotension", 0, "vasopressin alone (not counted as a vasopressor, as in ASTCT)", p.any_refs)
    grade = sc.one_pressor
    parts = [p.finding if p.counted else "vasopressor running"]
    refs = p.any_refs
    if p.together is not None and sc.multiple_pressors is not None:
        grade = max(grade, sc.multiple_pressors)
    if sc.pressor_hours_split is not None:
        long_ = p.longest_run >= timedelta(hours=sc.pressor_hours_split)
        start = _fmt_t(p.run_start) if p.run_start else "?"
        parts.append(
            f"vasopressors continuously for {hours_text(p.longest_run)} from {start} "
            f"({'>=' if long_ else '<'} {sc.pressor_hours_split:g} h)"
        )
        if long_:
            grade = max(grade, sc.long_pressor)
    if sc.high_dose is not None and sc.high_dose > grade:
        if p.high is None:
            why = "; ".join(parts) + f"; high-dose unknown: {p.high_why}"
            return Domain(
                "hypotension",
                None,
                why,
                refs,
                needs="high-dose vasopressor rule or rates",
                ceiling=sc.high_dose,
                at_least=grade,
            )
        parts.append(p.high_why if p.high else f"not high-dose ({p.high_why})")
        if p.high:
            grade = sc.high_dose
            refs = tuple(dict.fromkeys((*refs, *p.high_refs)))
    finding = "; ".join(parts)
    return Domain("hypotension", grade, f"{finding} -> grade {grade}", refs, finding=finding)


def _oxygen_domain(sc: Scale, f: Facts) -> Domain:
    o = f.oxygen
    if o.ventilator is not None:
        finding = f"invasive mechanical ventilation at {_fmt_t(o.ventilator.t)}"
        return Domain(
            "hypoxia", sc.ventilator, f"{finding} -> grade {sc.ventilator}", (o.ventilator.ref,), finding=finding
        )
    # Without any oxygen record a ventilator is not excluded; with one, the scale's oxygen rows cap it.
    ceiling = sc.ventilator if not o.charted else max(sc.oxygen_lt40, sc.oxygen_ge40)
    if sc.oxygen is None:
        if not o.charted:
            return Domain("hypoxia", None, o.fio2_why, needs=C.OXYGEN_DEVICE, ceiling=sc.ventilator)
        return Domain("hypoxia", 0, "no invasive ventilation charted (this scale grades no other oxygen support)")
    if sc.oxygen == "any":
        if o.any_o2 is None:
            return Domain("hypoxia", None, o.any_why, needs=o.fio2_needs or C.OXYGEN_FLOW, ceiling=ceiling)
        if o.any_o2:
            g = sc.oxygen_lt40
            finding = f"oxygen requirement ({o.any_why})"
            return Domain("hypoxia", g, f"{finding} -> grade {g}", o.any_refs, finding=finding)
        return Domain("hypoxia", 0, o.any_why, o.any_refs)
    if o.fio2 is None:
        return Domain("hypoxia", None, o.fio2_why, needs=o.fio2_needs or C.FIO2, ceiling=ceiling)
    low, high = o.fio2
    if low >= FIO2_THRESHOLD_PCT:
        g = sc.oxygen_ge40
        finding = f"{o.fio2_why} (>= {FIO2_THRESHOLD_PCT:g}%)"
        return Domain("hypoxia", g, f"{finding} -> grade {g}", o.fio2_refs, finding=finding)
    if high < FIO2_THRESHOLD_PCT:
        g = sc.oxygen_lt40 if high > ROOM_AIR_FIO2_PCT else 0
        finding = f"{o.fio2_why} (< {FIO2_THRESHOLD_PCT:g}%)"
        return Domain("hypoxia", g, f"{finding} -> grade {g}", o.fio2_refs, finding=finding)
    why = f"{o.fio2_why}: the estimate straddles {FIO2_THRESHOLD_PCT:g}%, so a charted FiO2 is needed"
    return Domain("hypoxia", None, why, o.fio2_refs, needs=C.FIO2, ceiling=sc.oxygen_ge40)


def _organ_domains(sc: Scale, f: Facts) -> list[Domain]:
    out = []
    for kind, table in (("creatinine", sc.creatinine), ("transaminase", sc.transaminase)):
        if not table:
            continue
        o = f.organ[kind]
        name = "creatinine" if kind == "creatinine" else "transaminases"
        if o.grade is None:
            out.append(Domain(name, None, o.why, o.refs, needs=o.needs, ceiling=max(table.values())))
            continue
        g = table.get(o.grade, 0)
        why = f"{o.why} -> {sc.method} grade {g}" if o.grade else o.why
        out.append(Domain(name, g, why, o.refs, finding=o.finding))
    return out


def grade_scale(sc: Scale, f: Facts, brief: bool = False) -> GradeResult:
    head = f.window_text
    gate = fever_gate(f.fever)
    notes: list[str] = []
    if not brief:  # the rationale's notes; the course's samples have none
        notes = [*crs_notes(gate), f"Not evaluable from data: {sc.not_evaluable}.", sc.choices]
        notes += ignored_items_note(f.ignored)
    if gate.domain is None:
        return no_crs(sc.method, sc.name, f.at, gate, head, notes, f.crs_findings(brief), brief=brief)
    domains = [gate.domain, _hypotension_domain(sc, f), _oxygen_domain(sc, f)]
    organ = _organ_domains(sc, f)
    if organ and gate.grade == 0 and all(d.grade == 0 for d in domains[1:]):
        # Masked fever with no hypotension or hypoxia: nothing shows CRS is still active, so a
        # lab abnormality is not attributed to it (iectox choice; ASTCT: the grade is then
        # driven by hypotension and hypoxia, and a masked fever never expires).
        notes.append("Organ toxicity not graded: fever masked and no hypotension or hypoxia in the window.")
        organ = []
    domains += organ
    considered = [] if brief else list(f.considered)
    return combine(sc.method, sc.name, f.at, domains, head, notes, considered, f.crs_findings(brief), brief=brief)


def grade_cres(data: PatientData, at: datetime, cfg: GradingConfig, brief: bool = False) -> GradeResult:
    lo = at - cfg.window
    head = "" if brief else window_text(lo, at)
    scores = [s for s in data.window(C.CARTOX_10, lo, at) if s.value is not None]
    considered = [s.ref for s in scores]
    domains: list[Domain] = []
    if scores:
        worst = min(scores, key=lambda s: s.value or 0.0)
        g = band(worst.value or 0.0, CARTOX10_BANDS)
        finding = f"worst CARTOX-10 {worst.shown} at {_fmt_t(worst.t)}"
        domains.append(Domain("CARTOX-10", g, f"{finding} -> grade {g}", (worst.ref,), finding=finding))
    else:
        domains.append(Domain("CARTOX-10", None, "not recorded.", needs=C.CARTOX_10, ceiling=3))
    conscious = data.window(C.CONSCIOUSNESS, lo, at)
    considered += [s.ref for s in conscious]
    obtunded = next((s for s in conscious if s.code in CRES_OBTUNDED), None)
    if obtunded is not None:
        finding = f"{obtunded.code} at {_fmt_t(obtunded.t)} (obtunded)"
        domains.append(Domain("consciousness", 4, f"{finding} -> grade 4", (obtunded.ref,), finding=finding))
    elif conscious or scores:
        domains.append(Domain("consciousness", 0, "not obtunded" if conscious else "a CARTOX-10 could be taken"))
    else:
        domains.append(Domain("consciousness", None, "not recorded.", needs=C.CONSCIOUSNESS))
    for concept in CRES_UNVERIFIED_ROWS:
        found = [s for s in data.window(concept, lo, at) if s.code not in (None, "none")]
        considered += [s.ref for s in found]
        if found:
            s = found[-1]
            why = f"{s.code} at {_fmt_t(s.t)}: the CRES {concept} rows are not verified, so it cannot be graded"
            domains.append(Domain(concept, None, why, (s.ref,), needs=f"verified CRES {concept} rule", ceiling=4))
    notes = [
        "CARTOX-10 0-2 is grade 3 as in clinical-rules.md (one secondary source says 0-1); 'obtunded' read as "
        "unarousable. Papilledema, CSF pressure, seizure, motor and edema rows are not verified and not graded.",
        "Sedation and other causes cannot be excluded from data.",
    ]
    notes += ignored_note(data, frozenset({C.CARTOX_10}))
    return combine(CRES_METHOD, CRES_SCALE, at, domains, head, notes, considered, brief=brief)
