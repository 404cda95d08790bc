"""Application service: FHIR inputs -> core grading -> FHIR outputs. No HTTP, no database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..codebook import Codebook
from ..config.runtime import gc_paused
from ..config.settings import Settings
from ..core.concepts import C
from ..core.config import ATLANTA_FIO2_POINTS, GradingConfig, HypotensionRule, OlderConfig
from ..core.course import Course, CourseConfig, course_of
from ..core.facts import Facts, facts_at
from ..core.model import BIRTH_DATE, GradeResult, LeftOut, PatientData, completed_years
from ..core.registry import BY_METHOD, REGISTRY
from ..core.scores import ScoreConfig, ScoreResult, all_scores
from ..fhir.emit import (
    collection,
    course_assessment,
    course_parameters,
    inputs_outcome,
    provenance,
    risk_assessment,
    score_assessment,
    validate_emitted,
)
from ..fhir.errors import FhirError
from ..fhir.ingest import (
    Entry,
    Parsed,
    load_json,
    parse_patient_entries,
    split_entries,
    stream_entries,
    year_out_of_range,
)
from ..observe.metrics import stage

EVALUATE_BUNDLE_TYPES = frozenset({"collection", "batch", "transaction", "searchset"})


def grading_config(settings: Settings) -> GradingConfig:
    return GradingConfig(
        window=timedelta(hours=settings.window_hours),
        capd_max_age_years=settings.capd_max_age_years,
        hypotension=HypotensionRule(
            settings.adult_sbp_below_mmhg, settings.adult_map_below_mmhg, settings.adult_from_age_years
        ),
        room_air_when_spo2_only=settings.room_air_when_spo2_only,
        older=OlderConfig(
            high_dose=settings.high_dose_vasopressors,
            fio2_points=ATLANTA_FIO2_POINTS
            if settings.fio2_estimate_points is None
            else tuple(sorted(settings.fio2_estimate_points)),
            ctcae_organ_version=settings.ctcae_organ_version,
            uln_creatinine_mg_dl=settings.uln_creatinine_mg_dl,
            uln_ast_u_l=settings.uln_ast_u_l,
            uln_alt_u_l=settings.uln_alt_u_l,
            baseline_lookback=timedelta(hours=settings.pre_lymphodepletion_lookback_hours),
        ),
    )


class Grader:
    """Grades one patient's data at any time on every scale; the scales share one set of
    per-window facts per time point (computed once, not once per scale)."""

    def __init__(self, data: PatientData, cfg: GradingConfig) -> None:
        self.data, self.cfg = data, cfg
        self._facts: dict[datetime, Facts] = {}

    def facts(self, t: datetime) -> Facts:
        f = self._facts.get(t)
        if f is None:
            f = self._facts[t] = facts_at(self.data, t, self.cfg)
        return f

    def grade(self, method: str, t: datetime, brief: bool = False) -> GradeResult:
        """The result of one scale at `t`; `brief`: the grade only, no rationale (the course)."""
        return BY_METHOD[method].grade(self.facts(t), brief)


# Every grading scale, in output order: (method code, scale name). The course is computed for each.
SCALES: tuple[tuple[str, str], ...] = tuple((s.method, s.name) for s in REGISTRY)


def course_config(settings: Settings) -> CourseConfig:
    return CourseConfig(
        step=timedelta(minutes=settings.course_step_minutes),
        resolution_period=timedelta(hours=settings.resolution_hours),
        max_span=timedelta(days=settings.course_max_days),
    )


def courses(grader: Grader, at: datetime, ccfg: CourseConfig) -> list[tuple[Course, GradeResult | None]]:
    """The course of every scale since day 0 (or the first input), with the result at its peak."""
    data = grader.data
    day0 = data.first_event(C.CART_INFUSION)
    start = day0.start if day0 else min(data.earliest_time() or at, at)
    out = []
    for method, scale in SCALES:

        def grade_at(t: datetime, method: str = method) -> int | None:
            return grader.grade(method, t, brief=True).grade

        c = course_of(method, scale, grade_at, start, at, ccfg, start_is_infusion=day0 is not None)
        peak = grader.grade(method, c.peak_time) if c.peak_time is not None else None
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
    indications: list[str]  # the codebook indication values of the patient's Conditions
    untimed: bool = False  # no timed input: `at` is the caller's `fallback_at`, not a time from the data
    left_out: tuple[LeftOut, ...] = ()  # inputs left out of grading (lenient handling), named
    # The warnings OperationOutcome: inputs left out, codes not mapped (None: neither)
    outcome: dict[str, Any] | None = None

    @property
    def resources(self) -> list[dict[str, Any]]:
        """What is stored and written back: the RiskAssessments and the Provenance."""
        return [*self.assessments, self.provenance]

    def bundle(self) -> dict[str, Any]:
        """The response: the resources, then the warnings OperationOutcome (left out, not mapped)."""
        return collection(self.resources + ([self.outcome] if self.outcome else []))

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
    if bad := year_out_of_range(t):
        raise FhirError.one(400, "value", f"at: {bad}", "at")
    return t


def evaluate_entries(
    entries: list[Entry],
    codebook: Codebook,
    settings: Settings,
    at: datetime | None,
    recorded: datetime,
    *,
    fallback_at: datetime | None = None,
    strict: bool | None = None,
    server: str = "",
) -> Evaluation:
    """Grade at `at`, else at the latest input time, else at `fallback_at` (then the Evaluation
    is `untimed`); 422 (expression "at") when there is none of the three. `strict` (default: the
    setting `input_handling`): an input the rules cannot use is a 422 rather than left out, named.
    `server`: the EHR server the patient's data came from (in the results' business keys)."""
    with gc_paused():  # config/runtime.py: the parse's objects are acyclic
        return _evaluate(entries, codebook, settings, at, recorded, fallback_at, strict, server)[0]


def evaluate_with_grader(
    entries: list[Entry],
    codebook: Codebook,
    settings: Settings,
    at: datetime | None,
    recorded: datetime,
    server: str = "",
) -> tuple[Evaluation, Grader]:
    """`evaluate_entries` (lenient; without timed input at `recorded`, `untimed`), and the Grader
    that holds the normalised data and the per-time facts it computed: for views that show the
    inputs and the hourly grades."""
    with gc_paused():
        return _evaluate(entries, codebook, settings, at, recorded, recorded, False, server)


def _evaluate(
    entries: list[Entry],
    codebook: Codebook,
    settings: Settings,
    at: datetime | None,
    recorded: datetime,
    fallback_at: datetime | None,
    strict: bool | None,
    server: str = "",
) -> tuple[Evaluation, Grader]:
    strict = settings.input_handling == "strict" if strict is None else strict
    with stage("parse"):
        parsed = parse_patient_entries(
            entries,
            codebook,
            strict=strict,
            site_tz=settings.site_tz(),
            infusion_event_max_hours=settings.infusion_event_max_hours,
        )
    data = parsed.data
    at = at or data.latest_time()
    untimed = at is None and fallback_at is not None
    at = at or fallback_at
    if at is None:
        raise FhirError.one(422, "required", "no timed input: give the evaluation time `at`", "at")
    _check_birth_date(data, f"{parsed.patient.path}.birthDate", at, strict)
    grader = Grader(data, grading_config(settings))
    with stage("grade"):
        results = [grader.grade(method, at) for method, _ in SCALES]
    ccfg = course_config(settings)
    with stage("course"):
        course_results = courses(grader, at, ccfg)
    with stage("scores"):
        scores = all_scores(data, at, score_config(settings))
    with stage("emit"):
        return _emit(parsed, data, grader, results, course_results, scores, settings, at, recorded, untimed, server)


def _emit(
    parsed: Parsed,
    data: PatientData,
    grader: Grader,
    results: list[GradeResult],
    course_results: list[tuple[Course, GradeResult | None]],
    scores: list[ScoreResult],
    settings: Settings,
    at: datetime,
    recorded: datetime,
    untimed: bool,
    server: str,
) -> tuple[Evaluation, Grader]:
    """The FHIR resources of an evaluation, validated, and the Evaluation that carries them."""
    ccfg = course_config(settings)
    base = settings.canonical_base
    ref = data.patient_ref
    assessments = [risk_assessment(r, ref, base, server=server) for r in results]
    assessments += [course_assessment(c, peak, ref, base, ccfg, server) for c, peak in course_results]
    assessments += [score_assessment(s, ref, base, server) for s in scores]
    inputs = [data.patient_ref] + [ref for r in results for ref in (*r.considered, *r.basis)]
    inputs += [ref for _, peak in course_results if peak is not None for ref in peak.basis]
    inputs += [ref for s in scores for ref in s.basis]
    prov = provenance(assessments, inputs, base, recorded)
    validate_emitted([*assessments, prov])
    indications = sorted({value for value, _ in data.indications})
    has_warnings = data.left_out or parsed.unmapped
    outcome = inputs_outcome(data.left_out, parsed.unmapped, data.patient_ref, at) if has_warnings else None
    if outcome is not None:
        validate_emitted([outcome])
    evaluation = Evaluation(
        data.patient_ref,
        at,
        results,
        [c for c, _ in course_results],
        scores,
        assessments,
        prov,
        indications,
        untimed,
        tuple(data.left_out),
        outcome,
    )
    return evaluation, grader


MAX_AGE_YEARS = 130  # plausibility: older than any documented human (docs/clinical-choices.md)


def _check_birth_date(data: PatientData, path: str, at: datetime, strict: bool) -> None:
    """A birth date after `at`, or more than MAX_AGE_YEARS before it, is impossible: the age is
    unknown (left out, named), never a neonate or a centenarian by mistake."""
    births = data.birth_dates()
    if not births:
        return
    if births[0] > at.date():
        why = f"birthDate (earliest {births[0].isoformat()}) is after the evaluation time {at.date().isoformat()}"
    elif completed_years(births[-1], at.date()) > MAX_AGE_YEARS:
        why = f"birthDate gives an age over {MAX_AGE_YEARS} years at the evaluation time"
    else:
        return
    if strict:
        raise FhirError.one(422, "value", why, path)
    data.birth_date, data.birth_latest = None, None
    data.left_out.append(LeftOut(data.patient_ref, path, why, BIRTH_DATE, None, ((path, why),)))


def evaluate_body(
    body: bytes,
    codebook: Codebook,
    settings: Settings,
    at: datetime | None,
    recorded: datetime,
    *,
    strict: bool | None = None,
) -> Evaluation:
    """The stateless `$evaluate`: a Bundle (or lone Patient) in, an Evaluation out."""

    def run() -> Evaluation:  # its locals (the parsed JSON) are freed before the collector resumes
        most, types = settings.max_bundle_entries, EVALUATE_BUNDLE_TYPES
        if len(body) > settings.stream_parse_above_bytes:
            entries = stream_entries(body, max_entries=most, bundle_types=types)
        else:
            entries = split_entries(load_json(body), max_entries=most, bundle_types=types)
        return _evaluate(entries, codebook, settings, at, recorded, None, strict)[0]

    with gc_paused():  # config/runtime.py
        return run()
