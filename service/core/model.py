"""Normalised, unit-tagged inputs and graded outputs of the pure core."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import NamedTuple, TypeVar, cast

T = TypeVar("T")


def fmt_time(t: datetime) -> str:
    """A time for rationales: ISO 8601 to the minute, with its offset."""
    return _iso_minutes(t, t.utcoffset())


@lru_cache(maxsize=8192)
def _iso_minutes(t: datetime, offset: timedelta | None) -> str:
    # The course writes the same few hundred times thousands of times (1.7 µs each, 0.3 cached).
    # Keyed by the offset too: equal instants in two offsets are equal datetimes, not equal text.
    return t.isoformat(timespec="minutes")


def window_text(lo: datetime, at: datetime) -> str:
    """A look-back window for rationales."""
    return f"Window {fmt_time(lo)} to {fmt_time(at)}."


def age_days(birth: date | None, at: datetime) -> int | None:
    """Age in days on the date of `at` (None: birth date unknown)."""
    return None if birth is None else (at.date() - birth).days


def completed_years(birth: date, on: date) -> int:
    """Age in completed years on `on` (a birthday on the day counts)."""
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


@dataclass(frozen=True, slots=True)
class Sample:
    """One observed value of a concept, in the concept's canonical unit.

    `value` is set for quantities and scores, `code` (a codebook value name) for coded
    concepts. `ref` is the FHIR reference of the source resource, `shown` the value as sent
    (with its original unit), for rationales.
    """

    concept: str
    t: datetime
    ref: str
    value: float | None = None
    unit: str | None = None
    code: str | None = None
    shown: str = ""
    ref_high: float | None = None  # upper limit of normal (referenceRange.high), canonical unit


@dataclass(frozen=True, slots=True)
class Administration:
    """A drug given over [start, end]; end None means still running (ongoing)."""

    concept: str
    start: datetime
    end: datetime | None
    ref: str
    rate: float | None = None  # canonical unit of the concept, when a rate was sent
    unit: str | None = None
    shown: str = ""
    product: str | None = None  # cart-infusion: the codebook product value, when known

    def overlaps(self, lo: datetime, hi: datetime) -> bool:
        return self.start <= hi and (self.end is None or self.end >= lo)


@dataclass(frozen=True, slots=True)
class Ignored:
    """An input not used (or used only in part), and why: said in the rationale."""

    ref: str
    reason: str
    concept: str


@dataclass(frozen=True, slots=True)
class LeftOut:
    """A resource (or its part) the rules cannot use: a bad or partial date, a dateTime without
    timezone, an unknown unit, an implausible value, an unresolvable reference. It is left out of
    grading and named with its FHIRPath and reason; a grade it could change is indeterminate.
    `concept` None: not known what it would feed; `t` None: its time is unknown (any window)."""

    ref: str
    path: str
    reason: str
    concept: str | None = None
    t: datetime | None = None
    problems: tuple[tuple[str, str], ...] = ()  # every (FHIRPath, reason) found in the resource


BIRTH_DATE = "birth-date"  # LeftOut.concept of an unusable Patient.birthDate (age unknown)
UNKNOWN_DRUG = "medication"  # LeftOut.concept of an administration whose Medication is not resolved


@dataclass
class PatientData:
    """Everything the core knows about one patient, normalised by the FHIR adapter."""

    patient_ref: str
    birth_date: date | None = None
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # concept -> sorted by t
    administrations: dict[str, list[Administration]] = field(default_factory=dict)
    ignored: list[Ignored] = field(default_factory=list)
    indications: list[tuple[str, str]] = field(default_factory=list)  # (codebook value, Condition ref)
    left_out: list[LeftOut] = field(default_factory=list)  # unusable inputs, named (lenient handling)
    # A partial birthDate ("1980", "1980-05"): birth_date is its earliest day, birth_latest its last.
    birth_latest: date | None = None
    assumed: list[Ignored] = field(default_factory=list)  # inputs read under a site setting (timezone)

    _times: dict[str, list[datetime]] = field(default_factory=dict, repr=False, compare=False)
    # Per-patient values the rules derive once and read at every time point (facts.py).
    memo: dict[object, object] = field(default_factory=dict, repr=False, compare=False)

    def birth_dates(self) -> tuple[date, ...]:
        """The possible birth dates: (), one date, or the first and last day of a partial date."""
        if self.birth_date is None:
            return ()
        return (self.birth_date,) if self.birth_latest is None else (self.birth_date, self.birth_latest)

    def series(self, concept: str) -> list[Sample]:
        return self.samples.get(concept, [])

    def once(self, key: object, make: Callable[[], T]) -> T:
        """`make()` for `key`, made once for this patient (what the rules derive per patient, per
        scale or per distinct window and read at every time point); `key` names all it depends on."""
        if key not in self.memo:
            self.memo[key] = make()
        return cast(T, self.memo[key])

    def window(self, concept: str, lo: datetime, hi: datetime) -> list[Sample]:
        """The samples of a concept with lo <= t <= hi (series are sorted: bisect, not a scan)."""
        series = self.samples.get(concept)
        if not series:
            return []
        start, end = self.span(concept, lo, hi)
        return series[start:end]

    def span(self, concept: str, lo: datetime, hi: datetime) -> tuple[int, int]:
        """Where `window(concept, lo, hi)` lies in the concept's series (start, end): equal spans,
        the same samples (what a per-window memo is keyed by)."""
        times = self._times.get(concept)
        if times is None:
            series = self.samples.get(concept)
            if not series:
                return 0, 0
            times = self._times[concept] = [s.t for s in series]
        return bisect_left(times, lo), bisect_right(times, hi)

    def given(self, concept: str) -> list[Administration]:
        return self.administrations.get(concept, [])

    def first_event(self, concept: str) -> Administration | None:
        events = self.given(concept)
        return min(events, key=lambda a: a.start) if events else None

    def earliest_time(self) -> datetime | None:
        times = [s[0].t for s in self.samples.values() if s]
        times += [a.start for adm in self.administrations.values() for a in adm]
        return min(times) if times else None

    def latest_time(self) -> datetime | None:
        times = [s[-1].t for s in self.samples.values() if s]
        times += [a.end or a.start for adm in self.administrations.values() for a in adm]
        return max(times) if times else None


class DomainFinding(NamedTuple):
    """One graded domain of a result (fever, hypotension, ICE, ...): its grade (None: unknown),
    the inputs it rests on and, when unknown, the inputs it needs."""

    name: str
    grade: int | None
    refs: tuple[str, ...] = ()
    needs: str = ""


@dataclass(frozen=True, slots=True)
class CrsFindings:
    """The deciding CRS facts of a window, as data (rationales are rendered from the same facts).

    `fever_present` is None when no temperature was recorded in the window. Vasopressors are the
    counted agents (vasopressin excluded): `vasopressors_concurrent` is 2 when two different agents
    ran at the same time, else the number running (0 or 1). `oxygen_support` is one of
    OXYGEN_SUPPORT_CLASSES (service/core/facts.py), None when no oxygen record is in the window.
    Beyond fever the fields are filled only when CRS is present (fever or masked fever).
    """

    fever_present: bool | None = None
    fever_masked: bool = False
    fever_refs: tuple[str, ...] = ()
    vasopressors_concurrent: int = 0
    vasopressor_agents: tuple[str, ...] = ()
    vasopressor_refs: tuple[str, ...] = ()
    vasopressin: bool = False
    oxygen_support: str | None = None
    oxygen_flow_l_min: float | None = None  # highest recorded flow in the window
    fio2_pct: float | None = None  # highest charted FiO2 in the window
    oxygen_refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class GradeResult:
    """A graded outcome. grade None means indeterminate (never silently 0).

    The rationale is rendered from the other fields; consumers read the fields, never the prose.
    `floor` is the grade the data present already prove when the result is indeterminate (None
    when graded, or when nothing is proven above 0); `verdict` is the sentence the rationale
    opens with.
    """

    method: str
    scale: str
    at: datetime
    grade: int | None
    rationale: str
    basis: tuple[str, ...]
    missing: tuple[str, ...] = ()
    considered: tuple[str, ...] = ()  # every input read while grading (Provenance entities)
    floor: int | None = None
    verdict: str = ""
    domains: tuple[DomainFinding, ...] = ()
    crs: CrsFindings | None = None  # CRS scales only

    @property
    def indeterminate(self) -> bool:
        return self.grade is None

    @property
    def fever_masked(self) -> bool:
        return self.crs is not None and self.crs.fever_masked
