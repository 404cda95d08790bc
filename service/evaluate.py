"""Application service: FHIR inputs -> core grading -> FHIR outputs. No HTTP, no database."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .codebook import Codebook
from .core.astct import (
    CRS_METHOD,
    CRS_SCALE,
    ICANS_METHOD,
    ICANS_SCALE,
    GradingConfig,
    HypotensionRule,
    grade_crs,
    grade_icans,
)
from .core.course import Course, CourseConfig, course_of
from .core.model import GradeResult, PatientData
from .core.scores import ScoreConfig, ScoreResult, all_scores
from .fhir.emit import (
    collection,
    course_assessment,
    course_parameters,
    provenance,
    risk_assessment,
    score_assessment,
    validate_emitted,
)
from .fhir.errors import FhirError
from .fhir.ingest import Entry, load_json, parse_patient_entries, split_entries
from .settings import Settings

EVALUATE_BUNDLE_TYPES = frozenset({"collection", "batch", "transaction", "searchset"})


def grading_config(settings: Settings) -> GradingConfig:
    return GradingConfig(
        window=timedelta(hours=settings.window_hours),
        capd_max_age_years=settings.capd_max_age_years,
        hypotension=HypotensionRule(
            settings.adult_sbp_below_mmhg, settings.adult_map_below_mmhg, settings.adult_from_age_years
        ),
    )


GradeFn = Callable[[PatientData, datetime, GradingConfig], GradeResult]
# Every grading scale: (method code, scale name, grading function). The course is computed for each.
SCALES: tuple[tuple[str, str, GradeFn], ...] = (
    (CRS_METHOD, CRS_SCALE, grade_crs),
    (ICANS_METHOD, ICANS_SCALE, grade_icans),
)


def course_config(settings: Settings) -> CourseConfig:
    return CourseConfig(
        step=timedelta(minutes=settings.course_step_minutes),
        resolution_period=timedelta(hours=settings.resolution_hours),
    )


def courses(
    data: PatientData, at: datetime, cfg: GradingConfig, ccfg: CourseConfig
) -> list[tuple[Course, GradeResult | None]]:
    """The course of every scale since day 0 (or the first input), with the result at its peak."""
    day0 = data.first_event("cart-infusion")
    start = day0.start if day0 else min(data.earliest_time() or at, at)
    out = []
    for method, scale, fn in SCALES:

        def grade_at(t: datetime, fn: GradeFn = fn) -> int | None:
            return fn(data, t, cfg).grade

        c = course_of(method, scale, grade_at, start, at, ccfg, start_is_infusion=day0 is not None)
        peak = fn(data, c.peak_time, cfg) if c.peak_time is not None else None
        out.append((c, peak))
    return out


def score_config(settings: Settings) -> ScoreConfig:
    return ScoreConfig(
        tolerance=timedelta(hours=settings.score_tolerance_hours),
        pre_ld_lookback=timedelta(hours=settings.pre_lymphodepletion_lookback_hours),
    )


@dataclass(frozen=True)
class Evaluation:
    patient_ref: str
    at: datetime
    results: list[GradeResult]
    courses: list[Course]
    scores: list[ScoreResult]
    assessments: list[dict[str, Any]]
    provenance: dict[str, Any]

    @property
    def resources(self) -> list[dict[str, Any]]:
        return [*self.assessments, self.provenance]

    def bundle(self) -> dict[str, Any]:
        return collection(self.resources)

    def course_parameters(self, settings: Settings) -> dict[str, Any]:
        """`$course`: every scale's course as FHIR Parameters (validated)."""
        current = {r.method: r for r in self.results}
        params = course_parameters(self.courses, current, settings.canonical_base, course_config(settings))
        validate_emitted([params])
        return params


def parse_at(raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        t = datetime.fromisoformat(raw)
    except ValueError:
        raise FhirError.one(400, "value", f"invalid dateTime {raw!r}", "at") from None
    if t.tzinfo is None:
        raise FhirError.one(400, "value", "at needs a timezone (e.g. 2026-01-06T10:00:00+00:00)", "at")
    return t


def evaluate_entries(
    entries: list[Entry], codebook: Codebook, settings: Settings, at: datetime | None, recorded: datetime
) -> Evaluation:
    parsed = parse_patient_entries(entries, codebook)
    data = parsed.data
    at = at or data.latest_time()
    if at is None:
        raise FhirError.one(422, "required", "no timed input: give the evaluation time `at`", "at")
    cfg = grading_config(settings)
    results = [fn(data, at, cfg) for _, _, fn in SCALES]
    ccfg = course_config(settings)
    course_results = courses(data, at, cfg, ccfg)
    scores = all_scores(data, at, score_config(settings))
    base = settings.canonical_base
    assessments = [risk_assessment(r, data.patient_ref, base) for r in results]
    assessments += [course_assessment(c, peak, data.patient_ref, base, ccfg) for c, peak in course_results]
    assessments += [score_assessment(s, data.patient_ref, base) for s in scores]
    inputs = [data.patient_ref] + [ref for r in results for ref in (*r.considered, *r.basis)]
    inputs += [ref for _, peak in course_results if peak is not None for ref in peak.basis]
    inputs += [ref for s in scores for ref in s.basis]
    prov = provenance(assessments, inputs, base, recorded)
    validate_emitted([*assessments, prov])
    return Evaluation(data.patient_ref, at, results, [c for c, _ in course_results], scores, assessments, prov)


def evaluate_body(
    body: bytes, codebook: Codebook, settings: Settings, at: datetime | None, recorded: datetime
) -> Evaluation:
    """The stateless `$evaluate`: a Bundle (or lone Patient) in, an Evaluation out."""
    doc = load_json(body)
    entries = split_entries(doc, max_entries=settings.max_bundle_entries, bundle_types=EVALUATE_BUNDLE_TYPES)
    return evaluate_entries(entries, codebook, settings, at, recorded)
