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

Every scale reads one set of per-window facts (`Facts`), computed once per time point and
shared, and maps them to domain grades through the tables below. What no scale defines
numerically is configuration with no default (high-dose vasopressors: Lee 2014 Table 2 could
not be verified) or a documented, configurable table (FiO2 from oxygen flow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise

from .astct import (
    CRS_CONCEPTS,
    OXYGEN_DEVICE_GRADE,
    VASOPRESSIN,
    VASOPRESSORS_COUNTED,
    FeverGate,
    GradingConfig,
    crs_notes,
    fever_gate,
    hypotension,
    no_crs,
    pressors_running,
)
from .config import ATLANTA_FIO2_POINTS, ATLANTA_SOURCE, FIO2_ESTIMATE_DEVICES, HighDoseRule, OlderConfig
from .grading import MAX_GRADE, Domain, band, combine, ignored_note
from .model import Administration, GradeResult, PatientData, Sample
from .model import fmt_time as _fmt_t
from .scores import lymphodepletion

# --- organ toxicity: CTCAE tables (scale-sources §7) ------------------------------------

# (lower bound, inclusive?, grade): the grade for ratio r is that of the last row r passes.
Bands = tuple[tuple[float, bool, int], ...]
ORGAN_ULN_BANDS: dict[tuple[str, str], Bands] = {
    # Creatinine increased: ">ULN - 1.5 x ULN" 1; ">1.5 - 3.0 x ULN" 2; ">3.0 - 6.0 x ULN" 3; ">6.0 x ULN" 4.
    ("5.0", "creatinine"): ((1.0, False, 1), (1.5, False, 2), (3.0, False, 3), (6.0, False, 4)),
    ("4.03", "creatinine"): ((1.0, False, 1), (1.5, False, 2), (3.0, False, 3), (6.0, False, 4)),
    # AST/ALT increased (baseline normal): ">ULN - 3.0 x ULN" 1; ">3.0 - 5.0" 2; ">5.0 - 20.0" 3; ">20.0" 4.
    ("5.0", "transaminase"): ((1.0, False, 1), (3.0, False, 2), (5.0, False, 3), (20.0, False, 4)),
    ("4.03", "transaminase"): ((1.0, False, 1), (3.0, False, 2), (5.0, False, 3), (20.0, False, 4)),
}
ORGAN_BASELINE_BANDS: dict[tuple[str, str], Bands] = {
    # v5 creatinine: ">1.5 - 3.0 x baseline" 2; ">3.0 x baseline" 3.
    ("5.0", "creatinine"): ((1.5, False, 2), (3.0, False, 3)),
    # v4.03 creatinine: ">1 - 1.5 x baseline" 1; ">1.5 - 3.0 x baseline" 2; ">3.0 baseline" 3.
    ("4.03", "creatinine"): ((1.0, False, 1), (1.5, False, 2), (3.0, False, 3)),
    # v5 AST/ALT, baseline abnormal: "1.5 - 3.0 x baseline" 1; ">3.0 - 5.0" 2; ">5.0 - 20.0" 3; ">20.0" 4.
    ("5.0", "transaminase"): ((1.5, True, 1), (3.0, False, 2), (5.0, False, 3), (20.0, False, 4)),
}
ORGAN_LABS = (("creatinine", "creatinine"), ("ast", "transaminase"), ("alt", "transaminase"))


def _ratio_grade(ratio: float, bands: Bands) -> int:
    grade = 0
    for low, inclusive, g in bands:
        if ratio > low or (inclusive and ratio == low):
            grade = g
    return grade


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
CRS_SCALES: tuple[Scale, ...] = (LEE, PENN, MSKCC, CARTOX, CTCAE4, CTCAE5)

CRES_METHOD = "cartox-cres"
CRES_SCALE = "CARTOX CRES grading with CARTOX-10 (Neelapu SS et al., Nat Rev Clin Oncol 2018;15:47-62)"
# CARTOX-10 (0-10): 7-9 grade 1 and 3-6 grade 2 (two secondary sources); 0-2 grade 3 as in
# clinical-rules.md §2 (one source says 0-1 but then leaves 2 in no band); 10 is no impairment.
CARTOX10_BANDS: tuple[tuple[int, int, int], ...] = ((10, 10, 0), (7, 9, 1), (3, 6, 2), (0, 2, 3))
CRES_OBTUNDED = frozenset({"unarousable"})  # "obtunded" grade 4, read as unarousable
CRES_UNVERIFIED_ROWS = ("seizure", "motor-weakness", "cerebral-edema")

# "O2 < 40% / >= 40%" (Lee, MSKCC, CARTOX, CTCAE v5): FiO2 in %; room air is 21%.
FIO2_THRESHOLD_PCT = 40.0
ROOM_AIR_FIO2_PCT = 21.0

FACT_CONCEPTS = (
    "systolic-bp",
    "mean-arterial-pressure",
    "oxygen-device",
    "oxygen-flow",
    "fio2",
    "creatinine",
    "ast",
    "alt",
)
OLDER_CRS_CONCEPTS = CRS_CONCEPTS | {"fio2", "creatinine", "ast", "alt"}


# --- per-window facts, shared by every scale ------------------------------------------------


@dataclass(frozen=True)
class PressorFacts:
    counted: Domain | None  # ASTCT's one-or-multiple reading (vasopressin not counted)
    any_refs: tuple[str, ...]  # every vasopressor incl. vasopressin in the window
    vasopressin_only: bool
    longest_run: timedelta  # longest continuous vasopressor run (incl. vasopressin) reaching the window
    run_start: datetime | None
    high: bool | None  # high-dose sustained (None: not configured or a rate missing)
    high_why: str
    high_refs: tuple[str, ...]


@dataclass(frozen=True)
class OxygenFacts:
    ventilator: Sample | None
    # FiO2 reading: (low, high) bounds in %, how it was obtained, refs; None when unknown.
    fio2: tuple[float, float] | None
    fio2_why: str
    fio2_refs: tuple[str, ...]
    fio2_needs: str
    # Any credited oxygen requirement (ASTCT crediting: positive pressure alone, else with a flow).
    any_o2: bool | None
    any_why: str
    any_refs: tuple[str, ...]
    charted: bool  # any oxygen device, flow or FiO2 in the window (so no ventilator was charted)


@dataclass(frozen=True)
class OrganFacts:
    grade: int | None
    why: str
    refs: tuple[str, ...]
    needs: str
    finding: str | None = None  # the lab value and its ratio, without the CTCAE grade (None: `why`)


@dataclass(frozen=True)
class Facts:
    at: datetime
    lo: datetime
    gate: FeverGate
    hypotension: Domain | None  # the configured no-pressor hypotension reading (None: pressors ran)
    pressors: PressorFacts
    oxygen: OxygenFacts
    organ: dict[str, OrganFacts]  # "creatinine", "transaminase"
    considered: tuple[str, ...]
    ignored: tuple[str, ...]


def _intervals(admins: list[Administration], at: datetime) -> list[tuple[datetime, datetime, Administration]]:
    return [(a.start, min(a.end or at, at), a) for a in admins if a.start <= at]


def _longest_run(
    admins: list[Administration], lo: datetime, at: datetime
) -> tuple[timedelta, datetime | None, tuple[str, ...]]:
    """The longest union of touching/overlapping administrations that reaches [lo, at]."""
    spans = sorted(_intervals(admins, at), key=lambda x: x[0])
    best, best_start = timedelta(0), None
    refs: tuple[str, ...] = ()
    cur: list[tuple[datetime, datetime, Administration]] = []
    for span in [*spans, None]:
        if cur and (span is None or span[0] > max(e for _, e, _ in cur)):
            start, end = cur[0][0], max(e for _, e, _ in cur)
            if end >= lo and end - start >= best:
                best, best_start, refs = end - start, start, tuple(a.ref for _, _, a in cur)
            cur = []
        if span is not None:
            cur.append(span)
    return best, best_start, refs


def _high_dose(
    admins: list[Administration], lo: datetime, at: datetime, rule: HighDoseRule | None
) -> tuple[bool | None, str, tuple[str, ...]]:
    """High-dose for >= rule.sustained_hours at some time reaching the window (Lee 2014 Table 2)."""
    if rule is None:
        return None, "no high-dose vasopressor rule configured (Lee 2014 Table 2 not verified)", ()
    spans = [s for s in _intervals(admins, at) if s[1] > s[0]]
    cuts = sorted({t for s, e, _ in spans for t in (s, e)})
    runs: list[tuple[datetime, datetime, str, tuple[str, ...]]] = []
    unknown: list[str] = []
    run_start: datetime | None = None
    run_end = at
    run_refs: list[str] = []
    last_why = ""
    for a, b in pairwise(cuts):
        running = [x for s, e, x in spans if s <= a and e >= b and (x.rate is None or x.rate > 0)]
        rates: dict[str, float] = {}
        missing = [x for x in running if x.rate is None]
        for x in running:
            if x.rate is not None:
                rates[x.concept] = max(rates.get(x.concept, 0.0), x.rate)
        if missing and b >= lo:
            unknown.append(missing[0].ref)
        high, why = rule.is_high(rates) if rates and not missing else (False, "")
        if high:
            if run_start is None:
                run_start, run_refs = a, []
            run_refs += [x.ref for x in running]
            last_why = why
            run_end = b
        elif run_start is not None:
            runs.append((run_start, run_end, last_why, tuple(dict.fromkeys(run_refs))))
            run_start = None
    if run_start is not None:
        runs.append((run_start, run_end, last_why, tuple(dict.fromkeys(run_refs))))
    need = timedelta(hours=rule.sustained_hours)
    for s, e, why, refs in runs:
        if e >= lo and e - s >= need:
            return (
                True,
                f"high-dose from {_fmt_t(s)} for {_hours(e - s)} ({why}; sustained >= {rule.sustained_hours:g} h)",
                refs,
            )
    if unknown:
        return None, "a vasopressor without a recorded rate: dose level unknown", tuple(unknown)
    return False, f"no high-dose run of >= {rule.sustained_hours:g} h", ()


def _hours(d: timedelta) -> str:
    return f"{d.total_seconds() / 3600:g} h"


def _pressor_facts(data: PatientData, lo: datetime, at: datetime, cfg: OlderConfig) -> PressorFacts:
    since = lo - cfg.pressor_lookback
    admins = [a for c in (*VASOPRESSORS_COUNTED, VASOPRESSIN) for a in data.given(c) if a.overlaps(since, at)]
    in_window = [a for a in admins if a.overlaps(lo, at) and (a.rate is None or a.rate > 0)]
    counted = pressors_running(data, lo, at)
    run, run_start, _ = _longest_run(admins, lo, at) if in_window else (timedelta(0), None, ())
    if in_window:
        high, high_why, high_refs = _high_dose(admins, lo, at, cfg.high_dose)
    else:
        high, high_why, high_refs = False, "", ()
    return PressorFacts(
        counted,
        tuple(a.ref for a in in_window),
        bool(in_window) and counted is None,
        run,
        run_start,
        high,
        high_why,
        high_refs,
    )


def _fio2_estimate(flow_l_min: float, points: tuple[tuple[float, float], ...]) -> tuple[float, float] | None:
    if not points:
        return None
    if flow_l_min >= points[-1][0]:
        return points[-1][1], 100.0
    for (f0, v0), (f1, v1) in pairwise(points):
        if f0 <= flow_l_min <= f1:
            if flow_l_min == f0:
                return v0, v0
            if flow_l_min == f1:
                return v1, v1
            return v0, v1
    return None


def _oxygen_facts(data: PatientData, lo: datetime, at: datetime, cfg: OlderConfig) -> OxygenFacts:
    devices = [s for s in data.window("oxygen-device", lo, at) if s.code in OXYGEN_DEVICE_GRADE]
    flows = [s for s in data.window("oxygen-flow", lo, at) if s.value is not None]
    fio2s = [s for s in data.window("fio2", lo, at) if s.value is not None]
    vent = next((s for s in reversed(devices) if s.code == "mechanical-ventilation"), None)
    nippv = [s for s in devices if s.code in ("cpap", "bipap")]
    flowing = [s for s in flows if (s.value or 0.0) > 0]
    # FiO2: a charted FiO2 decides; else an estimate from flow on devices the table covers.
    fio2: tuple[float, float] | None = None
    fio2_refs: tuple[str, ...] = ()
    needs = ""
    if fio2s:
        top = max(fio2s, key=lambda s: s.value or 0.0)
        fio2 = (top.value or 0.0, top.value or 0.0)
        why = f"FiO2 {top.shown} charted at {_fmt_t(top.t)}"
        fio2_refs = (top.ref,)
    else:
        other = [s for s in devices if s.code not in FIO2_ESTIMATE_DEVICES and s.code != "none"]
        if flowing and not other and cfg.fio2_points:
            top = max(flowing, key=lambda s: s.value or 0.0)
            fio2 = _fio2_estimate(top.value or 0.0, cfg.fio2_points)
            dev = next((s for s in devices if s.code in FIO2_ESTIMATE_DEVICES), None)
            why = f"FiO2 estimated from oxygen flow {top.shown} at {_fmt_t(top.t)}"
            if fio2 is not None:
                span = f"{fio2[0]:g}%" if fio2[0] == fio2[1] else f"{fio2[0]:g}-{fio2[1]:g}%"
                why += f" as {span} ({ATLANTA_SOURCE if cfg.fio2_points == ATLANTA_FIO2_POINTS else 'site table'})"
            fio2_refs = (top.ref,) + ((dev.ref,) if dev else ())
        elif devices and all(s.code == "none" for s in devices) and not flowing:
            fio2 = (ROOM_AIR_FIO2_PCT, ROOM_AIR_FIO2_PCT)
            why = f"room air (oxygen device none at {_fmt_t(devices[-1].t)})"
            fio2_refs = (devices[-1].ref,)
        elif flowing and not other:
            top = max(flowing, key=lambda s: s.value or 0.0)
            why = f"oxygen flow {top.shown} at {_fmt_t(top.t)} without a charted FiO2 (estimate switched off)"
            needs = "fio2"
        elif other or nippv:
            s = (other or nippv)[-1]
            why = f"oxygen device {s.code} at {_fmt_t(s.t)} without a charted FiO2 (no estimate for this device)"
            needs = "fio2"
        elif devices:
            s = devices[-1]
            why = f"oxygen device {s.code} at {_fmt_t(s.t)} without a flow or FiO2 (oxygen for comfort not excluded)"
            needs = "fio2 or oxygen-flow"
        else:
            why = "no FiO2, oxygen device or flow recorded"
            needs = "fio2 or oxygen-flow"
    # Any oxygen requirement, credited as ASTCT does (positive pressure alone; else with a flow).
    any_o2: bool | None
    any_refs: tuple[str, ...]
    if nippv:
        any_o2, any_why, any_refs = True, f"{nippv[-1].code} at {_fmt_t(nippv[-1].t)}", (nippv[-1].ref,)
    elif fio2s and fio2 is not None and fio2[0] > ROOM_AIR_FIO2_PCT:
        any_o2, any_why, any_refs = True, why, fio2_refs
    elif flowing:
        top = max(flowing, key=lambda s: s.value or 0.0)
        any_o2, any_why, any_refs = True, f"oxygen flow {top.shown} at {_fmt_t(top.t)}", (top.ref,)
    elif fio2 is not None or (flows and not [s for s in devices if s.code != "none"]):
        any_o2, any_why, any_refs = False, "no supplemental oxygen", fio2_refs
    else:
        any_o2, any_why, any_refs = None, why, ()
    charted = bool(devices or flows or fio2s)
    return OxygenFacts(vent, fio2, why, fio2_refs, needs, any_o2, any_why, any_refs, charted)


def _uln(sample: Sample, concept: str, cfg: OlderConfig) -> tuple[float | None, str]:
    if sample.ref_high is not None:
        return sample.ref_high, "referenceRange"
    configured = {"creatinine": cfg.uln_creatinine_mg_dl, "ast": cfg.uln_ast_u_l, "alt": cfg.uln_alt_u_l}[concept]
    return configured, "configured ULN"


def _baseline(data: PatientData, concept: str, ld: Administration | None, cfg: OlderConfig) -> Sample | None:
    if ld is None:
        return None
    before = [s for s in data.window(concept, ld.start - cfg.baseline_lookback, ld.start) if s.t < ld.start]
    return before[-1] if before and before[-1].value is not None else None


def _lab_grade(
    data: PatientData, concept: str, kind: str, lo: datetime, at: datetime, ld: Administration | None, cfg: OlderConfig
) -> OrganFacts:
    version = cfg.ctcae_organ_version
    values = [s for s in data.window(concept, lo, at) if s.value is not None]
    if not values:
        return OrganFacts(None, f"no {concept} in the window", (), concept)
    base = _baseline(data, concept, ld, cfg)
    best: OrganFacts | None = None
    for s in values:
        uln, uln_src = _uln(s, concept, cfg)
        if uln is None or uln <= 0:
            return OrganFacts(
                None, f"{concept} {s.shown} without an upper limit of normal", (s.ref,), f"ULN for {concept}"
            )
        v = s.value or 0.0
        ratio = v / uln
        base_ratio = (v / base.value) if base is not None and base.value else None
        bands_base = ORGAN_BASELINE_BANDS.get((version, kind))
        if kind == "transaminase" and base is not None and (base.value or 0.0) > uln and bands_base:
            g = _ratio_grade(base_ratio or 0.0, bands_base)
            rule = f"{base_ratio:.2f} x abnormal baseline {base.shown}"
        else:
            g = _ratio_grade(ratio, ORGAN_ULN_BANDS[(version, kind)])
            rule = f"{ratio:.2f} x ULN {uln:g} ({uln_src})"
            if kind == "creatinine" and base_ratio is not None and bands_base:
                gb = _ratio_grade(base_ratio, bands_base)
                if gb > g:  # both criteria apply; the higher grade is taken (iectox choice)
                    g, rule = gb, f"{base_ratio:.2f} x baseline {base.shown if base else ''}"
        refs = (s.ref,) + ((base.ref,) if base is not None and "baseline" in rule else ())
        finding = f"{concept} {s.shown} at {_fmt_t(s.t)} = {rule}"
        why = f"{finding} -> CTCAE v{version} grade {g}"
        if best is None or (best.grade or 0) < g:
            best = OrganFacts(g, why, refs, "", finding)
    assert best is not None
    if base is None and best.grade:
        best = OrganFacts(best.grade, best.why + " (no pre-lymphodepletion baseline)", best.refs, "", best.finding)
    return best


def _organ_facts(data: PatientData, lo: datetime, at: datetime, cfg: OlderConfig) -> dict[str, OrganFacts]:
    out: dict[str, OrganFacts] = {}
    ld = lymphodepletion(data)
    for kind in ("creatinine", "transaminase"):
        parts = [_lab_grade(data, c, k, lo, at, ld, cfg) for c, k in ORGAN_LABS if k == kind]
        known = [p for p in parts if p.grade is not None]
        unknown = [p for p in parts if p.grade is None]
        worst = max(known, key=lambda p: p.grade or 0) if known else None
        # Transaminitis is the worse of AST and ALT: one unknown keeps it unknown below grade 4.
        if unknown and not (worst is not None and worst.grade == MAX_GRADE):
            refs = tuple(r for p in parts for r in p.refs)
            out[kind] = OrganFacts(None, "; ".join(p.why for p in unknown), refs, " / ".join(p.needs for p in unknown))
        else:
            assert worst is not None
            out[kind] = worst
    return out


def facts_at(data: PatientData, at: datetime, cfg: GradingConfig) -> Facts:
    lo = at - cfg.window
    gate = fever_gate(data, lo, at)
    older = cfg.older
    pressors = _pressor_facts(data, lo, at, older)
    hypo = None if pressors.any_refs else hypotension(data, lo, at, cfg)
    considered = [s.ref for s in gate.temps]
    for c in FACT_CONCEPTS:
        considered += [s.ref for s in data.window(c, lo, at)]
    considered += pressors.any_refs
    if gate.day0:
        considered.append(gate.day0.ref)
    return Facts(
        at,
        lo,
        gate,
        hypo,
        pressors,
        _oxygen_facts(data, lo, at, older),
        _organ_facts(data, lo, at, older),
        tuple(considered),
        tuple(ignored_note(data, OLDER_CRS_CONCEPTS)),
    )


# --- grading ------------------------------------------------------------------------------


def _hypotension_domain(sc: Scale, f: Facts) -> Domain:
    p = f.pressors
    if not p.any_refs:
        h = f.hypotension
        assert h is not None
        if h.grade == 2 and sc.hypotension_no_pressor is None:
            why = f"{h.short}: this scale's hypotension rows need a vasopressor (or IV fluids, not read)"
            return Domain("hypotension", 0, why, h.refs)
        if h.grade == 2:
            return Domain(
                "hypotension",
                sc.hypotension_no_pressor,
                h.why.replace("grade 2", f"grade {sc.hypotension_no_pressor}"),
                h.refs,
                finding=h.finding,
            )
        if h.grade is None and sc.hypotension_no_pressor is None:
            return Domain("hypotension", 0, "no vasopressor recorded (blood pressure alone is not graded here)")
        return Domain("hypotension", h.grade, h.why, h.refs, needs=h.needs, ceiling=sc.hypotension_no_pressor or 0)
    if p.vasopressin_only and not sc.vasopressin_counts and sc.pressor_hours_split is None:
        # MSKCC's "any vasopressors" duration counts vasopressin; the others do not grade it alone.
        return Domain("hypotension", 0, "vasopressin alone (not counted as a vasopressor, as in ASTCT)", p.any_refs)
    grade = sc.one_pressor
    multiple = p.counted is not None and p.counted.grade == MAX_GRADE
    parts: list[str] = []
    if p.counted is not None:
        parts.append(p.counted.short)
    else:
        parts.append("vasopressor running")
    refs = p.any_refs
    if multiple and sc.multiple_pressors is not None:
        grade = max(grade, sc.multiple_pressors)
    if sc.pressor_hours_split is not None:
        long_ = p.longest_run >= timedelta(hours=sc.pressor_hours_split)
        start = _fmt_t(p.run_start) if p.run_start else "?"
        parts.append(
            f"vasopressors continuously for {_hours(p.longest_run)} from {start} "
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
            return Domain("hypoxia", None, o.fio2_why, needs="oxygen-device", ceiling=sc.ventilator)
        return Domain("hypoxia", 0, "no invasive ventilation charted (this scale grades no other oxygen support)")
    if sc.oxygen == "any":
        if o.any_o2 is None:
            return Domain("hypoxia", None, o.any_why, needs=o.fio2_needs or "oxygen-flow", ceiling=ceiling)
        if o.any_o2:
            g = sc.oxygen_lt40
            finding = f"oxygen requirement ({o.any_why})"
            return Domain("hypoxia", g, f"{finding} -> grade {g}", o.any_refs, finding=finding)
        return Domain("hypoxia", 0, o.any_why, o.any_refs)
    if o.fio2 is None:
        return Domain("hypoxia", None, o.fio2_why, needs=o.fio2_needs or "fio2", ceiling=ceiling)
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
    return Domain("hypoxia", None, why, o.fio2_refs, needs="fio2", ceiling=sc.oxygen_ge40)


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


def grade_scale(sc: Scale, f: Facts) -> GradeResult:
    head = f"Window {_fmt_t(f.lo)} to {_fmt_t(f.at)}."
    notes = crs_notes(f.gate)
    notes.append(f"Not evaluable from data: {sc.not_evaluable}.")
    notes.append(sc.choices)
    notes += f.ignored
    if f.gate.domain is None:
        return no_crs(sc.method, sc.name, f.at, f.gate, head, notes)
    domains = [f.gate.domain, _hypotension_domain(sc, f), _oxygen_domain(sc, f)]
    organ = _organ_domains(sc, f)
    if organ and f.gate.grade == 0 and all(d.grade == 0 for d in domains[1:]):
        # Masked fever with no hypotension or hypoxia: nothing shows CRS is still active, so a
        # lab abnormality is not attributed to it (iectox choice; ASTCT: the grade is then
        # driven by hypotension and hypoxia, and a masked fever never expires).
        notes.append("Organ toxicity not graded: fever masked and no hypotension or hypoxia in the window.")
        organ = []
    domains += organ
    return combine(sc.method, sc.name, f.at, domains, head, notes, list(f.considered))


def grade_cres(data: PatientData, at: datetime, cfg: GradingConfig) -> GradeResult:
    lo = at - cfg.window
    head = f"Window {_fmt_t(lo)} to {_fmt_t(at)}."
    scores = [s for s in data.window("cartox-10", lo, at) if s.value is not None]
    considered = [s.ref for s in scores]
    domains: list[Domain] = []
    if scores:
        worst = min(scores, key=lambda s: s.value or 0.0)
        g = band(worst.value or 0.0, CARTOX10_BANDS)
        finding = f"worst CARTOX-10 {worst.shown} at {_fmt_t(worst.t)}"
        domains.append(Domain("CARTOX-10", g, f"{finding} -> grade {g}", (worst.ref,), finding=finding))
    else:
        domains.append(Domain("CARTOX-10", None, "not recorded.", needs="cartox-10", ceiling=3))
    conscious = data.window("consciousness", lo, at)
    considered += [s.ref for s in conscious]
    obtunded = next((s for s in conscious if s.code in CRES_OBTUNDED), None)
    if obtunded is not None:
        finding = f"{obtunded.code} at {_fmt_t(obtunded.t)} (obtunded)"
        domains.append(Domain("consciousness", 4, f"{finding} -> grade 4", (obtunded.ref,), finding=finding))
    elif conscious or scores:
        domains.append(Domain("consciousness", 0, "not obtunded" if conscious else "a CARTOX-10 could be taken"))
    else:
        domains.append(Domain("consciousness", None, "not recorded.", needs="consciousness"))
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
    return combine(
        CRES_METHOD, CRES_SCALE, at, domains, head, notes + ignored_note(data, frozenset({"cartox-10"})), considered
    )
