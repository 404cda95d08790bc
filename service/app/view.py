"""What the clinician app shows (/app/): a patient's course at a glance, and the unit worklist.

Built from what iectox stores, with the same evaluation as `$evaluate` and the CDS hooks (lenient:
an unusable input is named, never dropped). The result is plain JSON for the browser; every
value carries the reference of the FHIR resource it came from, and every grade its scale.

- `patient_view`: the inputs as series in one canonical unit per concept (the value as sent is
  kept in `shown`), the drug episodes with their rates, the hourly grade of every scale on the
  course's grid, the current result of every scale with its deciding inputs and what is missing,
  the course summary (daily maximum) and the risk scores with their sources.
- `worklist`: every stored patient, the current ASTCT grades, the day since infusion and what
  changed in the last 24 hours (grade changes on the hourly grid, drugs started), sorted by the
  current worst grade. Rows are kept per patient while the stored inputs keep their fingerprint.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session

from ..codebook import Codebook
from ..config.settings import Settings
from ..core.astct import CRS_METHOD, ICANS_METHOD
from ..core.concepts import C, spec
from ..core.course import Course, sample_times
from ..core.model import Administration, GradeResult, PatientData
from ..core.scores import ScoreResult
from ..storage import repository
from .evaluate import Evaluation, Grader, course_config, evaluate_with_grader
from .store import patient_key, stored_entries

# Where each concept is drawn (panel) and its label; the unit is the concept's canonical unit.
SERIES: dict[str, tuple[str, str]] = {
    C.BODY_TEMPERATURE: ("temperature", "Temperature"),
    C.SYSTOLIC_BP: ("circulation", "Systolic BP"),
    C.MEAN_ARTERIAL_PRESSURE: ("circulation", "MAP"),
    C.SPO2: ("oxygen", "SpO2"),
    C.FIO2: ("oxygen", "FiO2"),
    C.OXYGEN_FLOW: ("oxygen", "O2 flow"),
    C.ICE_SCORE: ("neuro", "ICE score"),
    C.CAPD_SCORE: ("neuro", "CAPD score"),
    C.CARTOX_10: ("neuro", "CARTOX-10"),
}
EVENTS: dict[str, tuple[str, str]] = {
    C.OXYGEN_DEVICE: ("oxygen", "O2 device"),
    C.CONSCIOUSNESS: ("neuro", "Consciousness"),
    C.SEIZURE: ("neuro", "Seizure"),
    C.MOTOR_WEAKNESS: ("neuro", "Motor weakness"),
    C.CEREBRAL_EDEMA: ("neuro", "Cerebral edema"),
}
DRUGS: dict[str, str] = {
    C.NOREPINEPHRINE: "Norepinephrine",
    C.EPINEPHRINE: "Epinephrine",
    C.PHENYLEPHRINE: "Phenylephrine",
    C.DOPAMINE: "Dopamine",
    C.VASOPRESSIN: "Vasopressin",
    C.TOCILIZUMAB: "Tocilizumab",
    C.ANAKINRA: "Anakinra",
    C.DEXAMETHASONE: "Dexamethasone",
    C.METHYLPREDNISOLONE: "Methylprednisolone",
    C.ACETAMINOPHEN: "Acetaminophen",
    C.CART_INFUSION: "CAR T infusion",
    C.LYMPHODEPLETION: "Lymphodepletion",
}
UNIT_SHOWN = {"Cel": "°C", "mm[Hg]": "mmHg", "L/min": "L/min", "%": "%", "{score}": "points"}
HEADLINE = (CRS_METHOD, ICANS_METHOD)
# Drugs whose start in the last 24 hours the worklist names.
NOTABLE_STARTS = (
    C.TOCILIZUMAB,
    C.ANAKINRA,
    C.DEXAMETHASONE,
    C.METHYLPREDNISOLONE,
    C.NOREPINEPHRINE,
    C.EPINEPHRINE,
    C.PHENYLEPHRINE,
    C.DOPAMINE,
    C.VASOPRESSIN,
)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _unit(concept: str) -> str | None:
    s = spec(concept)
    return None if s is None or s.unit is None else UNIT_SHOWN.get(s.unit, s.unit)


def grade_text(r: GradeResult | None) -> str:
    if r is None:
        return "not evaluated"
    if r.grade is not None:
        return f"grade {r.grade}"
    return f"indeterminate (at least grade {r.floor})" if r.floor else "indeterminate"


def _result(r: GradeResult) -> dict[str, Any]:
    return {
        "at": _iso(r.at),
        "grade": r.grade,
        "floor": r.floor,
        "indeterminate": r.grade is None,
        "text": grade_text(r),
        "verdict": r.verdict,
        "rationale": r.rationale,
        "basis": list(r.basis),
        "missing": list(r.missing),
        "fever_masked": r.fever_masked,
        "domains": [{"name": d.name, "grade": d.grade, "refs": list(d.refs), "needs": d.needs} for d in r.domains],
    }


def _course(c: Course) -> dict[str, Any]:
    duration = c.duration
    return {
        "start": _iso(c.start),
        "start_is_infusion": c.start_is_infusion,
        "sampled_from": _iso(c.sampled_from),
        "onset": _iso(c.onset),
        "peak_grade": c.peak_grade,
        "peak_time": _iso(c.peak_time),
        "resolution": _iso(c.resolution),
        "duration_hours": None if duration is None else duration.total_seconds() / 3600,
        "daily_max": [{"day": d, "grade": g} for d, g in c.daily_max],
        "indeterminate_samples": c.indeterminate_samples,
    }


def _score(s: ScoreResult) -> dict[str, Any]:
    return {
        "method": s.method,
        "citation": s.citation,
        "label": s.label,
        "at": _iso(s.at),
        "value": s.value,
        "indeterminate": s.indeterminate,
        "missing": list(s.missing),
        "basis": list(s.basis),
        "predictions": [
            {
                "text": p.text,
                "probability": p.probability,
                "qualitative": p.qualitative,
                "relative_risk": p.relative_risk,
            }
            for p in s.predictions
        ],
    }


def _drug(a: Administration) -> dict[str, Any]:
    s = spec(a.concept)
    return {
        "concept": a.concept,
        "label": DRUGS.get(a.concept, a.concept),
        "kind": None if s is None else str(s.kind),
        "start": _iso(a.start),
        "end": _iso(a.end),
        "rate": a.rate,
        "unit": (a.unit or (s.unit if s else None)) if a.rate is not None else None,  # the rate's canonical unit
        "shown": a.shown,
        "product": a.product,
        "ref": a.ref,
    }


def _patient(data: PatientData, resource: dict[str, Any] | None) -> dict[str, Any]:
    names = (resource or {}).get("name")
    name = None
    if isinstance(names, list) and names and isinstance(names[0], dict):
        first = names[0]
        given = [g for g in first.get("given") or () if isinstance(g, str)]
        family = first.get("family") if isinstance(first.get("family"), str) else None
        name = first.get("text") if isinstance(first.get("text"), str) else " ".join([*given, *filter(None, [family])])
    return {"ref": data.patient_ref, "name": name or None, "birthDate": (resource or {}).get("birthDate")}


def _hourly(evaluation: Evaluation, settings: Settings) -> tuple[list[datetime], dict[str, list[int | None]]]:
    """The course grid and every scale's grade at each of its times (the course's own samples)."""
    course = evaluation.courses[0]
    times, _ = sample_times(course.start, evaluation.at, course_config(settings))
    return times, {c.method: list(c.grades) for c in evaluation.courses}


def patient_view(
    session: Session, patient_id: str, codebook: Codebook, settings: Settings, now: datetime, *, server: str
) -> dict:
    """The patient page's data (404 without a stored Patient of `server`)."""
    entries, _ = stored_entries(session, patient_id, server=server)
    evaluation, grader = evaluate_with_grader(entries, codebook, settings, None, now, server)
    data = grader.data
    resource = next((e.resource for e in entries if e.type == "Patient"), None)
    times, hourly = _hourly(evaluation, settings)
    day0 = data.first_event(C.CART_INFUSION)
    current = {r.method: r for r in evaluation.results}
    series = [
        {
            "concept": concept,
            "panel": panel,
            "label": label,
            "unit": _unit(concept),
            "points": [{"t": _iso(s.t), "v": s.value, "shown": s.shown, "ref": s.ref} for s in data.series(concept)],
        }
        for concept, (panel, label) in SERIES.items()
        if data.series(concept)
    ]
    events = [
        {
            "concept": concept,
            "panel": panel,
            "label": label,
            "t": _iso(s.t),
            "code": s.code,
            "shown": s.shown,
            "ref": s.ref,
        }
        for concept, (panel, label) in EVENTS.items()
        for s in data.series(concept)
    ]
    drugs = [_drug(a) for concept in DRUGS for a in data.given(concept)]
    return {
        "patient": {"id": patient_id, **_patient(data, resource)},
        "at": _iso(evaluation.at),
        "tz": settings.site_timezone,  # None: times are shown in the offset they carry
        "day0": _iso(day0.start) if day0 else None,
        "product": day0.product if day0 else None,
        "day": _day(day0.start, evaluation.at) if day0 else None,
        "step_minutes": settings.course_step_minutes,
        "hours": [_iso(t) for t in times],
        "scales": [
            {
                "method": c.method,
                "scale": c.scale,
                "headline": c.method in HEADLINE,
                "hourly": hourly[c.method],
                "current": _result(current[c.method]),
                # the result at the peak: when and why the maximum grade was reached
                "peak": _result(grader.grade(c.method, c.peak_time)) if c.peak_time and c.peak_grade else None,
                "course": _course(c),
            }
            for c in evaluation.courses
        ],
        "series": series,
        "events": events,
        "drugs": drugs,
        "scores": [_score(s) for s in evaluation.scores],
        "left_out": [
            {"ref": lo.ref, "path": lo.path, "reason": lo.reason, "concept": lo.concept} for lo in data.left_out
        ],
    }


def _day(day0: datetime, at: datetime) -> int:
    return (at - day0) // timedelta(days=1)


# --- the worklist ---------------------------------------------------------------------------------


def _headline(r: GradeResult | None) -> dict[str, Any]:
    return {
        "grade": None if r is None else r.grade,
        "floor": None if r is None else r.floor,
        "text": grade_text(r),
    }


def _peak(c: Course, day0: datetime | None) -> dict[str, Any]:
    """The maximum grade since day 0 (or since `sampled_from`, when the course was cut to its
    last IECTOX_COURSE_MAX_DAYS) and when it was first reached."""
    at = c.peak_time if c.peak_grade else None
    day = _day(day0, at) if day0 and at else None
    return {"grade": c.peak_grade, "at": _iso(at), "day": day, "sampled_from": _iso(c.sampled_from)}


def _worst(results: Sequence[GradeResult | None]) -> tuple[int, bool]:
    """The worst grade the headline scales show (an indeterminate one counts with its floor), and
    whether one is indeterminate (ranked above a determinate row of the same grade)."""
    grades = [g for r in results if r is not None for g in (r.grade, r.floor) if g is not None]
    return max(grades, default=0), any(r is None or r.grade is None for r in results)


def _changes(evaluation: Evaluation, grader: Grader, times: list[datetime], hourly: dict[str, list]) -> list[str]:
    """What changed in the 24 hours before the evaluation time (the latest input): each headline
    grade from the last sample at or before the window's start to now, with the highest grade in
    between when it was higher than both ("CRS 0 → 0 (reached 3)"), and the notable drugs started."""
    since = evaluation.at - timedelta(hours=24)
    start = max((i for i, t in enumerate(times) if t <= since), default=0)
    out = []
    for method, name in ((CRS_METHOD, "CRS"), (ICANS_METHOD, "ICANS")):
        window = hourly[method][start:]
        before, now = window[0], window[-1]
        peak = max((g for g in window if g is not None), default=None)
        shown = f"{name} {'?' if before is None else before} → {'?' if now is None else now}"
        if peak is not None and peak > max(g for g in (before, now, -1) if g is not None):
            out.append(f"{shown} (reached {peak})")
        elif before != now:
            out.append(shown)
    for concept in NOTABLE_STARTS:
        if any(since < a.start <= evaluation.at for a in grader.data.given(concept)):
            out.append(f"{DRUGS[concept]} started")
    return out


def worklist_row(
    session: Session, patient_id: str, codebook: Codebook, settings: Settings, now: datetime, server: str
) -> dict[str, Any]:
    entries, _ = stored_entries(session, patient_id, server=server)
    evaluation, grader = evaluate_with_grader(entries, codebook, settings, None, now, server)
    resource = next((e.resource for e in entries if e.type == "Patient"), None)
    times, hourly = _hourly(evaluation, settings)
    by = {r.method: r for r in evaluation.results}
    crs, icans = by.get(CRS_METHOD), by.get(ICANS_METHOD)
    worst, indeterminate = _worst([crs, icans])
    day0 = grader.data.first_event(C.CART_INFUSION)
    return {
        "id": patient_id,
        **_patient(grader.data, resource),
        "at": _iso(evaluation.at),
        "day": _day(day0.start, evaluation.at) if day0 else None,
        "product": day0.product if day0 else None,
        "crs": _headline(crs),
        "icans": _headline(icans),
        "peak": {c.method: _peak(c, day0.start if day0 else None) for c in evaluation.courses if c.method in HEADLINE},
        "worst": worst,
        "indeterminate": indeterminate,
        "changes": _changes(evaluation, grader, times, hourly) if not evaluation.untimed else [],
        "left_out": len(grader.data.left_out),
    }


class WorklistCache:
    """Worklist rows per patient, kept while the stored inputs keep their fingerprint (bounded,
    safe across request threads). The row depends on nothing else: the evaluation time is the
    latest input time."""

    def __init__(self, max_patients: int = 2048) -> None:
        self._items: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        self._max = max_patients
        self._lock = threading.Lock()

    def get(self, patient_id: str, fingerprint: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._items.get(patient_id)
            return found[1] if found is not None and found[0] == fingerprint else None

    def put(self, patient_id: str, fingerprint: str, row: dict[str, Any]) -> None:
        with self._lock:
            self._items[patient_id] = (fingerprint, row)
            self._items.move_to_end(patient_id)
            while len(self._items) > self._max:
                self._items.popitem(last=False)


def worklist(
    session: Session, codebook: Codebook, settings: Settings, now: datetime, cache: WorklistCache, *, server: str
) -> list[dict[str, Any]]:
    """Every stored patient's row (of `server`: the app user's EHR), worst current grade first
    (indeterminate above determinate at the same grade), then by id."""
    rows = []
    for patient_id in repository.stored_patient_ids(session, server=server):
        fingerprint = repository.input_fingerprint(session, patient_id, server=server)
        key = patient_key(server, patient_id)
        row = cache.get(key, fingerprint)
        if row is None:
            row = worklist_row(session, patient_id, codebook, settings, now, server)
            cache.put(key, fingerprint, row)
        rows.append(row)
    rows.sort(key=lambda r: (-r["worst"], not r["indeterminate"], r["id"]))
    return rows
