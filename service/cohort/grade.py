"""Pass 2 of a cohort job: grade one partition's patients, each over its whole course, on every
scale, with the same evaluation as `$evaluate` (the same codebook, settings and lenient handling:
an input the rules cannot use is left out and named, a grade it could change is indeterminate).

A patient's resources are the partition's lines naming them, plus every shared Medication. Each
entry's path is `<file>:<line>`, so every warning names where in the export its input is. A
resource whose patient has no Patient resource in the export is named, not graded; a patient the
adapter refuses (several Patients with one id, a subject it cannot place) is named, not graded.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from ..app.evaluate import Evaluation, Grader, course_config, evaluate_with_grader
from ..codebook import Codebook, load_codebook
from ..config.settings import Settings
from ..core.astct import CRS_METHOD, ICANS_METHOD
from ..core.concepts import C
from ..core.course import Course
from ..fhir.errors import FhirError
from ..fhir.ingest import Entry, newest_versions
from .export import read_shards

STEROIDS = (C.DEXAMETHASONE, C.METHYLPREDNISOLONE)


@lru_cache(maxsize=4)
def _codebook(base: str, overlay: Path | None, changed: float | None) -> Codebook:
    return load_codebook(base, overlay)  # once per worker process and overlay version (`changed`)


def codebook_for(settings: Settings) -> Codebook:
    overlay = settings.codebook_path
    return _codebook(settings.canonical_base, overlay, overlay.stat().st_mtime if overlay else None)


@dataclass
class PartitionResult:
    """Rows of every output table for one partition, and its FHIR output as NDJSON."""

    patients: int = 0
    resources: int = 0
    seen: set[str] = field(default_factory=set)  # every patient of the partition, graded or named
    courses: list[dict[str, Any]] = field(default_factory=list)
    daily: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    registry: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    risk_assessments: bytes = b""
    provenances: bytes = b""


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _grade(g: int | None) -> str:
    return "indeterminate" if g is None else str(g)


def complete(c: Course) -> bool:
    """Every hourly sample since day 0 was graded: its peak is the maximum, not a lower bound."""
    return c.indeterminate_samples == 0 and c.sampled_from is None


def max_grade(c: Course) -> str:
    """The maximum grade since day 0, or `indeterminate` when some hours could not be graded (or
    were not sampled) and could hold a higher grade than the peak of the rest (never a false 0)."""
    if c.peak_grade is not None and (complete(c) or c.peak_grade == 4):
        return str(c.peak_grade)
    return "indeterminate"


def _course_row(patient: str, c: Course, ev: Evaluation, step_hours: float) -> dict[str, Any]:
    current = next(r for r in ev.results if r.method == c.method)
    duration = c.duration
    return {
        "patient": patient,
        "method": c.method,
        "max_grade": max_grade(c),
        "max_grade_at_least": c.peak_grade,  # the peak of the hours that could be graded
        "onset": _iso(c.onset),
        "peak_at": _iso(c.peak_time if c.peak_grade else None),
        "resolved_at": _iso(c.resolution),
        "duration_hours": None if duration is None else duration.total_seconds() / 3600,
        "indeterminate_hours": c.indeterminate_samples * step_hours,
        "current_grade": _grade(current.grade),
        "missing_now": "; ".join(current.missing),
        "at": _iso(ev.at),
        "day0": _iso(c.start) if c.start_is_infusion else None,
        "sampled_from": _iso(c.sampled_from),
    }


def _yes_no(c: Course) -> str:
    """Registry forms ask yes or no: yes from grade 1; no only when every sample since day 0 was
    graded 0; else unknown."""
    if c.peak_grade is not None and c.peak_grade >= 1:
        return "yes"
    return "no" if c.peak_grade == 0 and complete(c) else "unknown"


def _first_date(grader: Grader, *concepts: str) -> str | None:
    starts = [a.start for concept in concepts for a in grader.data.given(concept)]
    return min(starts).date().isoformat() if starts else None


def _registry_row(patient: str, ev: Evaluation, grader: Grader) -> dict[str, Any]:
    by = {c.method: c for c in ev.courses}
    crs, icans = by[CRS_METHOD], by[ICANS_METHOD]
    day0 = grader.data.first_event(C.CART_INFUSION)
    return {
        "patient": patient,
        "product": day0.product if day0 else None,
        "indication": "; ".join(ev.indications) or None,
        "infusion_date": day0.start.date().isoformat() if day0 else None,
        "crs": _yes_no(crs),
        "crs_onset": crs.onset.date().isoformat() if crs.onset else None,
        "crs_max_grade": max_grade(crs),
        "icans": _yes_no(icans),
        "icans_onset": icans.onset.date().isoformat() if icans.onset else None,
        "icans_max_grade": max_grade(icans),
        "tocilizumab_first": _first_date(grader, C.TOCILIZUMAB),
        "corticosteroids_first": _first_date(grader, *STEROIDS),
    }


def grade_patient(
    patient: str,
    entries: list[Entry],
    codebook: Codebook,
    settings: Settings,
    at: datetime | None,
    recorded: datetime,
    out: PartitionResult,
) -> None:
    """Grade one patient as `$evaluate` would grade a Bundle of the same resources (the newest
    version of a repeated id, lenient handling); a patient the adapter refuses is named."""
    try:
        ev, grader = evaluate_with_grader(newest_versions(entries), codebook, settings, at, recorded)
    except FhirError as exc:
        for issue in exc.issues:
            reason = f"patient not graded: {issue.diagnostics}"
            out.warnings.append({"patient": patient, "where": str(issue.expression or ""), "reason": reason})
        return
    step_hours = course_config(settings).step.total_seconds() / 3600
    out.patients += 1
    for c in ev.courses:
        out.courses.append(_course_row(patient, c, ev, step_hours))
        out.daily += [
            {"patient": patient, "method": c.method, "day": d, "max_grade": _grade(g)} for d, g in c.daily_max
        ]
    for s in ev.scores:
        out.scores.append(
            {
                "patient": patient,
                "method": s.method,
                "label": s.label,
                "at": _iso(s.at),
                "value": s.value,
                "indeterminate": s.indeterminate,
                "missing": "; ".join(s.missing),
                "prediction": "; ".join(p.text for p in s.predictions),
                "probability": next((p.probability for p in s.predictions if p.probability is not None), None),
                "citation": s.citation,
            }
        )
    out.registry.append(_registry_row(patient, ev, grader))
    # the evaluation's warnings, as `$evaluate` returns them: inputs left out, codes not mapped
    for issue in (ev.outcome or {}).get("issue", ()):
        where = "; ".join(issue.get("expression") or ()) or ""
        out.warnings.append({"patient": patient, "where": where, "reason": str(issue.get("diagnostics", ""))})
    out.risk_assessments += b"".join(orjson.dumps(ra) + b"\n" for ra in ev.assessments)
    out.provenances += orjson.dumps(ev.provenance) + b"\n"


MAX_ORPHAN_NAMED = 20  # per patient missing from the export: its first resources named, the rest counted


def grade_partition(
    work: Path, partition: int, settings: Settings, at: datetime | None, recorded: datetime, known: frozenset[str]
) -> PartitionResult:
    """Grade every patient of one partition. `known`: the ids of the export's Patient resources."""
    codebook = codebook_for(settings)
    shared = [Entry(orjson.loads(raw), where) for _, where, raw in read_shards(work / "shared")]  # parsed once
    by_patient: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    out = PartitionResult()
    for pid, where, raw in read_shards(work / f"part-{partition}"):
        by_patient[pid].append((where, raw))
    for pid in sorted(by_patient):
        lines = by_patient.pop(pid)
        out.resources += len(lines)
        out.seen.add(pid)
        if pid not in known:
            reason = f"its patient Patient/{pid} is not in the export's Patient files: not graded"
            out.warnings += [
                {"patient": pid, "where": where, "reason": reason} for where, _ in lines[:MAX_ORPHAN_NAMED]
            ]
            if len(lines) > MAX_ORPHAN_NAMED:
                more = f"{len(lines) - MAX_ORPHAN_NAMED} more resources of Patient/{pid}, not in the export: not graded"
                out.warnings.append({"patient": pid, "where": "", "reason": more})
            continue
        entries = [Entry(orjson.loads(raw), where) for where, raw in lines]
        grade_patient(pid, entries + shared, codebook, settings, at, recorded, out)
    return out
