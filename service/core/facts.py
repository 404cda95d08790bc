"""Per-window CRS facts: neutral observations computed once per time point and shared by every
CRS scale.

Facts are what the data show, not grades: the hottest temperature and a masked fever, the blood
pressures below the configured hypotension rule, which vasopressors ran (alone or together, for
how long, at high dose), the oxygen support charted and the CTCAE grade of organ labs. ASTCT
(astct.py) and the older scales (older.py) each map these facts through their own tables; no
scale reads another scale's grade. Each part is computed on first use and then shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from itertools import pairwise

from .concepts import C
from .config import (
    ATLANTA_FIO2_POINTS,
    ATLANTA_SOURCE,
    FIO2_ESTIMATE_DEVICES,
    VASOPRESSIN,
    GradingConfig,
    HighDoseRule,
    OlderConfig,
)
from .ctcae_organ import OrganFacts, organ_facts
from .model import Administration, CrsFindings, Ignored, PatientData, Sample, age_days, completed_years, window_text
from .model import fmt_time as _fmt_t

# "Temperature >= 38 °C" (ASTCT CRS table, grade 1; the older scales define fever alike).
FEVER_C = 38.0
# Masked fever (ASTCT CRS table footnote): after antipyretic or anti-cytokine therapy
# (tocilizumab, corticosteroids) fever is no longer required.
FEVER_MASKING_DRUGS = (C.TOCILIZUMAB, C.ANAKINRA, C.DEXAMETHASONE, C.METHYLPREDNISOLONE, C.ACETAMINOPHEN)
# "Vasopressors" as ASTCT counts them: "multiple vasopressors (excluding vasopressin)".
VASOPRESSORS_COUNTED = (C.NOREPINEPHRINE, C.EPINEPHRINE, C.PHENYLEPHRINE, C.DOPAMINE)
VASOPRESSIN_NOTE = " Vasopressin ran in the window and is not counted as a vasopressor (ASTCT)."
# Oxygen devices of the codebook that the scales grade (the rows of astct.OXYGEN_DEVICE_GRADE).
OXYGEN_DEVICES = (
    "none",
    "low-flow-nasal-cannula",
    "blow-by",
    "high-flow-nasal-cannula",
    "face-mask",
    "non-rebreather",
    "venturi",
    "cpap",
    "bipap",
    "mechanical-ventilation",
)
INVASIVE_VENTILATION = "mechanical-ventilation"
NON_INVASIVE_POSITIVE_PRESSURE = ("cpap", "bipap")
ROOM_AIR_FIO2_PCT = 21.0  # FiO2 of room air, in %
# CrsFindings.oxygen_support: the most intensive oxygen support charted in the window.
OXYGEN_SUPPORT_CLASSES = (
    "invasive-ventilation",  # mechanical ventilation
    "positive-pressure",  # CPAP or BiPAP
    "supplemental",  # an oxygen flow > 0 or a charted FiO2 above room air
    "device-without-flow",  # a device other than "none" with no flow or FiO2 (comfort not excluded)
    "room-air",  # device "none", a zero flow or an FiO2 of room air
)

CRS_CONCEPTS = frozenset(
    {
        C.BODY_TEMPERATURE,
        C.SYSTOLIC_BP,
        C.MEAN_ARTERIAL_PRESSURE,
        C.OXYGEN_DEVICE,
        C.OXYGEN_FLOW,
        *VASOPRESSORS_COUNTED,
        VASOPRESSIN,
        *FEVER_MASKING_DRUGS,
        C.CART_INFUSION,
    }
)
# Windowed inputs read by the facts beyond temperature and drugs, and every concept they read.
FACT_CONCEPTS = (
    C.SYSTOLIC_BP,
    C.MEAN_ARTERIAL_PRESSURE,
    C.OXYGEN_DEVICE,
    C.OXYGEN_FLOW,
    C.FIO2,
    C.CREATININE,
    C.AST,
    C.ALT,
)
CRS_FACT_CONCEPTS = CRS_CONCEPTS | {C.FIO2, C.CREATININE, C.AST, C.ALT}


@dataclass(frozen=True)
class FeverFacts:
    """Temperatures of the window, day 0 and, without a fever in the window, a masked fever: the
    first CRS fever since day 0 followed, before `at`, by a masking drug."""

    temps: tuple[Sample, ...]
    day0: Administration | None
    hottest: Sample | None  # the highest temperature in the window
    masked: tuple[Sample, Administration] | None

    @property
    def present(self) -> bool:
        return self.hottest is not None and (self.hottest.value or 0.0) >= FEVER_C

    @cached_property
    def why(self) -> str:
        """The fever facts in words (rendered once, read by every CRS scale)."""
        hottest = self.hottest
        if self.present:
            assert hottest is not None
            return f"fever {hottest.shown} at {_fmt_t(hottest.t)} (>= {FEVER_C:g} °C)"
        if self.masked is not None:
            f, drug = self.masked
            return (
                f"fever masked: CRS fever {f.shown} at {_fmt_t(f.t)} followed by {drug.concept} at "
                f"{_fmt_t(drug.start)}, so fever is no longer required and the grade is driven by hypotension "
                "and hypoxia (ASTCT)."
            )
        if hottest is not None:
            return f"no fever (max {hottest.shown} at {_fmt_t(hottest.t)}; < {FEVER_C:g} °C) and no masking therapy."
        return "no body temperature recorded in the window and no masking therapy after a CRS fever."


@dataclass(frozen=True)
class BloodPressureFacts:
    """Pressures of the window against the configured hypotension rule (ASTCT sets no number)."""

    rule: str  # the rule, in words, for the patient's age
    low: tuple[Sample, ...]  # systolic pressures below the rule, then MAPs below it
    read: int  # systolic pressures and MAPs recorded in the window
    measured: bool  # the rule could be applied (a systolic pressure, or a MAP under the adult rule)

    @property
    def lowest(self) -> Sample | None:
        return min(self.low, key=lambda s: s.value or 0.0) if self.low else None

    @property
    def finding(self) -> str:
        s = self.lowest
        assert s is not None
        return f"hypotension not requiring vasopressors ({s.concept} {s.shown} at {_fmt_t(s.t)}; rule: {self.rule})"


@dataclass(frozen=True)
class PressorFacts:
    counted: tuple[Administration, ...]  # counted vasopressors running in the window (rate unknown or > 0)
    together: tuple[Administration, Administration] | None  # two different counted agents at the same time
    together_from: datetime | None
    vasopressin: tuple[Administration, ...]  # vasopressin overlapping the window (any rate)
    any_refs: tuple[str, ...]  # every vasopressor incl. vasopressin running in the window
    longest_run: timedelta  # longest continuous vasopressor run (incl. vasopressin) reaching the window
    run_start: datetime | None
    high: bool | None  # high-dose sustained (None: not configured or a rate missing)
    high_why: str
    high_refs: tuple[str, ...]

    @property
    def vasopressin_only(self) -> bool:
        return bool(self.any_refs) and not self.counted

    @property
    def concurrent(self) -> int:
        """Counted agents running at the same time: 2 (two or more), 1 or 0."""
        return 2 if self.together else (1 if self.counted else 0)

    @property
    def finding(self) -> str:
        """The counted vasopressors in words (one or multiple, vasopressin not counted)."""
        if self.together is not None:
            a, b = self.together
            start = self.together_from
            assert start is not None
            return (
                f"multiple vasopressors ({a.concept} and {b.concept} running together "
                f"from {_fmt_t(start)}; vasopressin not counted)"
            )
        first = self.counted[0]
        dose = f" {first.shown}" if first.shown else ""
        return f"one vasopressor ({first.concept} from {_fmt_t(first.start)}{dose})"


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
    devices: tuple[Sample, ...] = ()  # graded oxygen devices charted in the window
    flows: tuple[Sample, ...] = ()  # oxygen flows (L/min) with a value
    fio2s: tuple[Sample, ...] = ()  # charted FiO2 (%) with a value
    room_air_assumed: Sample | None = None  # the SpO2 read as room air (site setting), when used


def _first_fever(data: PatientData, since: datetime | None) -> Sample | None:
    """The first CRS fever at or after `since` (day 0), over the whole record: found once per
    patient and day 0, not once per time point (the course asks at every sample)."""
    temps = data.series(C.BODY_TEMPERATURE)
    return data.once(
        ("first-fever", since),
        lambda: next(
            (s for s in temps if s.value is not None and s.value >= FEVER_C and (since is None or s.t >= since)), None
        ),
    )


def _masking(data: PatientData, since: datetime | None, at: datetime) -> tuple[Sample, Administration] | None:
    """The first CRS fever since day 0 followed, before `at`, by a masking drug."""
    first = _first_fever(data, since)
    if first is None or first.t > at:
        return None
    drugs = [a for c in FEVER_MASKING_DRUGS for a in data.given(c) if first.t < a.start <= at]
    return (first, min(drugs, key=lambda a: a.start)) if drugs else None


def _fever_facts(data: PatientData, lo: datetime, at: datetime) -> FeverFacts:
    day0 = data.first_event(C.CART_INFUSION)
    temps = tuple(data.window(C.BODY_TEMPERATURE, lo, at))
    hottest = max(temps, key=lambda s: s.value or 0.0) if temps else None
    if hottest is not None and (hottest.value or 0.0) >= FEVER_C:
        return FeverFacts(temps, day0, hottest, None)
    return FeverFacts(temps, day0, hottest, _masking(data, day0.start if day0 else None, at))


def _hypotension_limits(data: PatientData, at: datetime, cfg: GradingConfig) -> tuple[float, float | None, str]:
    """(systolic limit, MAP limit or None, the rule in words) on the date of `at`: the age, hence
    the rule, changes by the day (made once per date, not per time point)."""
    rule = cfg.hypotension

    def limits() -> tuple[float, float | None, str]:
        # A partial birth date ("2020") gives a range of ages: its limits must agree at both ends,
        # else the age is unknown for this rule (the adult rule, which says so).
        ends = {rule.limits(age_days(b, at), completed_years(b, at.date())) for b in data.birth_dates()}
        return ends.pop() if len(ends) == 1 else rule.limits(None, None)

    return data.once(("hypotension-limits", rule, data.birth_dates(), at.date()), limits)


def _blood_pressure_facts(data: PatientData, lo: datetime, at: datetime, cfg: GradingConfig) -> BloodPressureFacts:
    sbp_lim, map_lim, rule = _hypotension_limits(data, at, cfg)
    sbp = data.window(C.SYSTOLIC_BP, lo, at)
    maps = data.window(C.MEAN_ARTERIAL_PRESSURE, lo, at)
    low = [s for s in sbp if s.value is not None and s.value < sbp_lim]
    if map_lim is not None:
        low += [s for s in maps if s.value is not None and s.value < map_lim]
    # The pediatric rule reads systolic pressure only.
    return BloodPressureFacts(rule, tuple(low), len(sbp) + len(maps), bool(sbp or (maps and map_lim is not None)))


def _together(
    runs: list[Administration], lo: datetime, at: datetime
) -> tuple[tuple[Administration, Administration], datetime] | None:
    """The first two different counted agents running at the same time, and since when."""
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a.concept != b.concept:
                start = max(a.start, b.start, lo)
                end = min(a.end or at, b.end or at, at)
                # Truly concurrent: one ending as the other starts is a switch, not two at once.
                instant = a.start == a.end or b.start == b.end
                if start < end or (instant and start == end):
                    return (a, b), start
    return None


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
    cur_end = at  # the latest end in `cur` (kept as it grows: a drip charted hourly has hundreds)
    for span in [*spans, None]:
        if cur and (span is None or span[0] > cur_end):
            start = cur[0][0]
            if cur_end >= lo and cur_end - start >= best:
                best, best_start, refs = cur_end - start, start, tuple(a.ref for _, _, a in cur)
            cur = []
        if span is not None:
            cur_end = span[1] if not cur else max(cur_end, span[1])
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
    # Between two cuts a span runs when it started by the first and ends after it (every end is a
    # cut). Swept once, not every span at every cut: drips charted as hourly events are hundreds.
    by_start = sorted(range(len(spans)), key=lambda i: spans[i][0])
    active: set[int] = set()
    nxt = 0
    for a, b in pairwise(cuts):
        while nxt < len(by_start) and spans[by_start[nxt]][0] <= a:
            active.add(by_start[nxt])
            nxt += 1
        active -= {i for i in active if spans[i][1] <= a}
        running = [x for i in sorted(active) if ((x := spans[i][2]).rate is None or x.rate > 0)]  # spans' order
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
                f"high-dose from {_fmt_t(s)} for {hours_text(e - s)} ({why}; sustained >= {rule.sustained_hours:g} h)",
                refs,
            )
    if unknown:
        return None, "a vasopressor without a recorded rate: dose level unknown", tuple(unknown)
    return False, f"no high-dose run of >= {rule.sustained_hours:g} h", ()


def hours_text(d: timedelta) -> str:
    return f"{d.total_seconds() / 3600:g} h"


def _pressor_facts(data: PatientData, lo: datetime, at: datetime, cfg: OlderConfig) -> PressorFacts:
    since = lo - cfg.pressor_lookback
    admins = [a for c in (*VASOPRESSORS_COUNTED, VASOPRESSIN) for a in data.given(c) if a.overlaps(since, at)]
    in_window = [a for a in admins if a.overlaps(lo, at) and (a.rate is None or a.rate > 0)]
    counted = [a for a in in_window if a.concept != VASOPRESSIN]
    together = _together(counted, lo, at)
    vasopressin = tuple(a for a in data.given(VASOPRESSIN) if a.overlaps(lo, at))
    run, run_start, _ = _longest_run(admins, lo, at) if in_window else (timedelta(0), None, ())
    if in_window:
        high, high_why, high_refs = _high_dose(admins, lo, at, cfg.high_dose)
    else:
        high, high_why, high_refs = False, "", ()
    return PressorFacts(
        tuple(counted),
        together[0] if together else None,
        together[1] if together else None,
        vasopressin,
        tuple(a.ref for a in in_window),
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


def _oxygen_facts(
    data: PatientData, lo: datetime, at: datetime, cfg: OlderConfig, room_air_on: bool = False
) -> OxygenFacts:
    devices = [s for s in data.window(C.OXYGEN_DEVICE, lo, at) if s.code in OXYGEN_DEVICES]
    flows = [s for s in data.window(C.OXYGEN_FLOW, lo, at) if s.value is not None]
    fio2s = [s for s in data.window(C.FIO2, lo, at) if s.value is not None]
    vent = next((s for s in reversed(devices) if s.code == "mechanical-ventilation"), None)
    nippv = [s for s in devices if s.code in ("cpap", "bipap")]
    flowing = [s for s in flows if (s.value or 0.0) > 0]
    room_air = spo2_room_air(data, lo, at, room_air_on) if not (devices or flows or fio2s) else None
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
            needs = C.FIO2
        elif other or nippv:
            s = (other or nippv)[-1]
            why = f"oxygen device {s.code} at {_fmt_t(s.t)} without a charted FiO2 (no estimate for this device)"
            needs = C.FIO2
        elif devices:
            s = devices[-1]
            why = f"oxygen device {s.code} at {_fmt_t(s.t)} without a flow or FiO2 (oxygen for comfort not excluded)"
            needs = "fio2 or oxygen-flow"
        elif room_air is not None:
            fio2 = (ROOM_AIR_FIO2_PCT, ROOM_AIR_FIO2_PCT)
            why = room_air_note(room_air)
            fio2_refs = (room_air.ref,)
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
    charted = bool(devices or flows or fio2s or room_air)
    return OxygenFacts(
        vent,
        fio2,
        why,
        fio2_refs,
        needs,
        any_o2,
        any_why,
        any_refs,
        charted,
        tuple(devices),
        tuple(flows),
        tuple(fio2s),
        room_air,
    )


def spo2_room_air(data: PatientData, lo: datetime, at: datetime, enabled: bool) -> Sample | None:
    """With the site setting on, the latest SpO2 of the window when no oxygen is charted in it
    (the caller checks that): many sites chart oxygen only when it is given."""
    if not enabled:
        return None
    spo2 = [s for s in data.window(C.SPO2, lo, at) if s.value is not None]
    return spo2[-1] if spo2 else None


def room_air_note(s: Sample) -> str:
    return (
        f"room air assumed (site setting): SpO2 {s.shown} at {_fmt_t(s.t)} charted and no oxygen device, "
        "flow or FiO2 in the window"
    )


class Facts:
    """The CRS facts of one window [at - window, at] of one patient. Each part is computed on
    first use, then shared by every scale graded at this time point."""

    def __init__(self, data: PatientData, at: datetime, cfg: GradingConfig) -> None:
        self.data, self.at, self.cfg = data, at, cfg
        self.lo = at - cfg.window

    @cached_property
    def window_text(self) -> str:
        return window_text(self.lo, self.at)

    @cached_property
    def fever(self) -> FeverFacts:
        return _fever_facts(self.data, self.lo, self.at)

    @cached_property
    def blood_pressure(self) -> BloodPressureFacts:
        return _blood_pressure_facts(self.data, self.lo, self.at, self.cfg)

    @cached_property
    def pressors(self) -> PressorFacts:
        return _pressor_facts(self.data, self.lo, self.at, self.cfg.older)

    @cached_property
    def oxygen(self) -> OxygenFacts:
        return _oxygen_facts(self.data, self.lo, self.at, self.cfg.older, self.cfg.room_air_when_spo2_only)

    @cached_property
    def organ(self) -> Mapping[str, OrganFacts]:  # "creatinine", "transaminase"
        return organ_facts(self.data, self.lo, self.at, self.cfg.older)

    @cached_property
    def considered(self) -> tuple[str, ...]:
        """Every input the facts read: temperatures, FACT_CONCEPTS, running vasopressors, day 0."""
        refs = [s.ref for s in self.fever.temps]
        for c in FACT_CONCEPTS:
            refs += [s.ref for s in self.data.window(c, self.lo, self.at)]
        refs += self.pressors.any_refs
        if self.fever.day0:
            refs.append(self.fever.day0.ref)
        return tuple(refs)

    @cached_property
    def ignored(self) -> tuple[Ignored, ...]:
        """Inputs of CRS_FACT_CONCEPTS left out of grading."""
        return tuple(i for i in self.data.ignored if i.concept in CRS_FACT_CONCEPTS)

    def crs_findings(self, brief: bool) -> CrsFindings | None:
        """`findings`, or None for a brief result that nothing reads them from: the course reads
        only the grade; with inputs left out or assumed, leftout.py reads them (its ceilings)."""
        if brief and not self.data.left_out and not self.data.assumed:
            return None
        return self.findings

    @cached_property
    def findings(self) -> CrsFindings:
        """The deciding CRS facts as data, for GradeResult.crs. Beyond fever they are filled only
        when CRS is present (fever or masked fever); otherwise they keep their defaults (not assessed)."""
        fv = self.fever
        present = None if fv.hottest is None else fv.present
        masked = not fv.present and fv.masked is not None
        if fv.present:
            assert fv.hottest is not None
            fever_refs: tuple[str, ...] = (fv.hottest.ref,)
        elif fv.masked is not None:
            fever_refs = (fv.masked[0].ref, fv.masked[1].ref)
        else:
            fever_refs = tuple(s.ref for s in fv.temps)
        if not (fv.present or masked):
            return CrsFindings(present, masked, fever_refs)
        p, o = self.pressors, self.oxygen
        running = p.together or p.counted
        support, support_refs = _oxygen_support(o)
        flow = max(o.flows, key=lambda s: s.value or 0.0) if o.flows else None
        fio2 = max(o.fio2s, key=lambda s: s.value or 0.0) if o.fio2s else None
        return CrsFindings(
            present,
            masked,
            fever_refs,
            vasopressors_concurrent=p.concurrent,
            vasopressor_agents=tuple(dict.fromkeys(a.concept for a in running)),
            vasopressor_refs=tuple(a.ref for a in running),
            vasopressin=bool(p.vasopressin),
            oxygen_support=support,
            oxygen_flow_l_min=flow.value if flow else None,
            fio2_pct=fio2.value if fio2 else None,
            oxygen_refs=support_refs,
        )


def _oxygen_support(o: OxygenFacts) -> tuple[str | None, tuple[str, ...]]:
    """The most intensive oxygen support charted (OXYGEN_SUPPORT_CLASSES) and its inputs."""
    if o.ventilator is not None:
        return "invasive-ventilation", (o.ventilator.ref,)
    nippv = [s for s in o.devices if s.code in NON_INVASIVE_POSITIVE_PRESSURE]
    if nippv:
        return "positive-pressure", (nippv[-1].ref,)
    flowing = [s for s in o.flows if (s.value or 0.0) > 0]
    if flowing:
        return "supplemental", (max(flowing, key=lambda s: s.value or 0.0).ref,)
    above_air = [s for s in o.fio2s if (s.value or 0.0) > ROOM_AIR_FIO2_PCT]
    if above_air:
        return "supplemental", (max(above_air, key=lambda s: s.value or 0.0).ref,)
    devices = [s for s in o.devices if s.code != "none"]
    if devices:
        return "device-without-flow", (devices[-1].ref,)
    if o.charted:
        return "room-air", tuple(s.ref for s in (*o.devices, *o.flows, *o.fio2s))[-1:]
    return None, ()


def facts_at(data: PatientData, at: datetime, cfg: GradingConfig) -> Facts:
    return Facts(data, at, cfg)
