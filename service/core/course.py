"""The course of a patient on one scale, from day 0 to `at`.

The current grade (the worst over the look-back window) is sampled on a regular grid from
day 0 (default every hour) and at `at`. From that series:
- onset: the first sample at grade >= 1;
- peak: the highest grade and the first time it was reached;
- resolution: the first sample after onset from which the grade stays 0 for the resolution
  period (24 h by default) with no indeterminate sample in between; duration = resolution - onset;
- daily maximum: the highest grade of each day since infusion (day n = [day0 + n d, day0 + (n+1) d)).
Indeterminate samples never count as 0: they break a run towards resolution, and a day with
only indeterminate samples has no maximum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .model import fmt_time


@dataclass(frozen=True)
class CourseConfig:
    step: timedelta = timedelta(hours=1)
    resolution_period: timedelta = timedelta(hours=24)
    # Samples only the last `max_span` before `at` (Settings.course_max_days): bounds the work of
    # an evaluation whose `at` lies far after its data; the course says where sampling began.
    max_span: timedelta = timedelta(days=100)


@dataclass(frozen=True)
class Course:
    method: str
    scale: str
    start: datetime
    at: datetime
    onset: datetime | None
    peak_grade: int | None
    peak_time: datetime | None
    resolution: datetime | None
    daily_max: tuple[tuple[int, int | None], ...]  # (day since infusion, max grade or None)
    samples: int
    indeterminate_samples: int
    start_is_infusion: bool = True
    sampled_from: datetime | None = None  # set when the span was cut to `max_span` before `at`
    # The grade at each sample time (sample_times), for views that draw the course.
    grades: tuple[int | None, ...] = field(default=(), compare=False, repr=False)

    @property
    def duration(self) -> timedelta | None:
        if self.onset is None or self.resolution is None:
            return None
        return self.resolution - self.onset

    def rationale(self, cfg: CourseConfig) -> str:
        hours = cfg.step.total_seconds() / 3600
        head = (
            f"Course of {self.scale} from {'day 0 (CAR T infusion)' if self.start_is_infusion else 'the first input'}"
            f" {fmt_time(self.start)} to {fmt_time(self.at)}, current grade sampled every {hours:g} h "
            f"({self.samples} samples, {self.indeterminate_samples} indeterminate)."
        )
        if self.sampled_from is not None:
            head += (
                f" Sampled only from {fmt_time(self.sampled_from)} (the last {cfg.max_span.days} days before "
                "the evaluation time, IECTOX_COURSE_MAX_DAYS): onset and peak are the first within that span."
            )
        if self.peak_grade is None:
            return f"{head} Indeterminate: no sample could be graded."
        if self.onset is None:
            return f"{head} Maximum grade 0: no onset (no sample at grade >= 1)."
        res_hours = cfg.resolution_period.total_seconds() / 3600
        if self.resolution is None:
            resolution = f"not resolved by {fmt_time(self.at)} (needs grade 0 for {res_hours:g} h)"
        else:
            resolution = (
                f"resolved {fmt_time(self.resolution)} (grade 0 held {res_hours:g} h), duration {_hours(self.duration)}"
            )
        assert self.peak_time is not None
        days = ", ".join(f"day {d}: {'?' if g is None else g}" for d, g in self.daily_max)
        return (
            f"{head} Onset {fmt_time(self.onset)}; peak grade {self.peak_grade} first at "
            f"{fmt_time(self.peak_time)}; {resolution}. Daily maximum: {days}. Each sample is the worst grade "
            "of its look-back window, so grades last the window's length after the finding."
        )


def _hours(d: timedelta | None) -> str:
    return "?" if d is None else f"{d.total_seconds() / 3600:g} h"


def grid(start: datetime, at: datetime, step: timedelta) -> list[datetime]:
    times = []
    t = start
    while t < at:
        times.append(t)
        t += step
    times.append(at)
    return times


def sample_times(start: datetime, at: datetime, cfg: CourseConfig) -> tuple[list[datetime], datetime | None]:
    """The times a course samples, and where sampling began when the span was cut to
    `cfg.max_span` before `at` (None: from `start`)."""
    first, sampled_from = start, None
    if at - start > cfg.max_span:
        steps = -(-(at - cfg.max_span - start) // cfg.step)  # ceiling: the first grid point in the span
        first = sampled_from = start + steps * cfg.step
    return (grid(first, at, cfg.step) if start <= at else [at]), sampled_from


def course_of(
    method: str,
    scale: str,
    grade_at: Callable[[datetime], int | None],
    start: datetime,
    at: datetime,
    cfg: CourseConfig,
    *,
    start_is_infusion: bool = True,
) -> Course:
    """Sample `grade_at` from `start` to `at` and summarise (see the module docstring); at most
    `cfg.max_span` before `at`, on the same grid (day numbers stay relative to `start`)."""
    times, sampled_from = sample_times(start, at, cfg)
    grades = [grade_at(t) for t in times]
    known = [(t, g) for t, g in zip(times, grades, strict=True) if g is not None]
    peak_grade = max((g for _, g in known), default=None)
    peak_time = next((t for t, g in known if g == peak_grade), None)
    onset = next((t for t, g in known if g >= 1), None)
    resolution = None
    if onset is not None:
        run_start: datetime | None = None
        for t, g in zip(times, grades, strict=True):
            if t <= onset:
                continue
            if g == 0:
                run_start = run_start or t
                if t - run_start >= cfg.resolution_period:
                    resolution = run_start
                    break
            else:
                run_start = None
    daily: dict[int, int | None] = {}
    for t, g in zip(times, grades, strict=True):
        day = (t - start) // timedelta(days=1)
        best = daily.get(day)
        daily[day] = g if best is None else (best if g is None else max(best, g))
    return Course(
        method,
        scale,
        start,
        at,
        onset,
        peak_grade,
        peak_time,
        resolution,
        tuple(sorted(daily.items())),
        len(times),
        len(times) - len(known),
        start_is_infusion,
        sampled_from,
        tuple(grades),
    )
