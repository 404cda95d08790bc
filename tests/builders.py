"""Builders of normalised core inputs (``service.core.model``) for the pure grading tests.

Times are hours relative to ``AT`` (negative = before). Every Sample and Administration gets a
unique source reference (``ref``), so tests never collide on ids.
"""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta

from service.core.model import Administration, PatientData, Sample

AT = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)
ADULT = date(1970, 1, 1)
_ids = itertools.count(1)


def t(hours: float) -> datetime:
    """A time `hours` relative to AT (negative = before)."""
    return AT + timedelta(hours=hours)


def ref(resource_type: str, concept: str) -> str:
    """A unique source reference such as ``Observation/body-temperature-17``."""
    return f"{resource_type}/{concept}-{next(_ids)}"


def obs(concept: str, hours: float = -2, value: float | None = None, code: str | None = None) -> Sample:
    shown = code if code is not None else f"{value:g}"
    return Sample(concept, t(hours), ref("Observation", concept), value=value, code=code, shown=shown)


def temp(value: float, hours: float = -2) -> Sample:
    return obs("body-temperature", hours, value)


def sbp(value: float, hours: float = -2) -> Sample:
    return obs("systolic-bp", hours, value)


def mean_ap(value: float, hours: float = -2) -> Sample:
    return obs("mean-arterial-pressure", hours, value)


def device(code: str, hours: float = -2) -> Sample:
    return obs("oxygen-device", hours, code=code)


def flow(value: float, hours: float = -2) -> Sample:
    return obs("oxygen-flow", hours, value)


def ice(score: int, hours: float = -2) -> Sample:
    return obs("ice-score", hours, float(score))


def capd(score: int, hours: float = -2) -> Sample:
    return obs("capd-score", hours, float(score))


def finding(concept: str, code: str, hours: float = -2) -> Sample:
    return obs(concept, hours, code=code)


def given(concept: str, start: float, end: float | None = None, rate: float | None = None) -> Administration:
    """`concept` given from t(start) to t(end); end None = ongoing."""
    return Administration(
        concept,
        t(start),
        None if end is None else t(end),
        ref("MedicationAdministration", concept),
        rate=rate,
    )


def bolus(concept: str, hours: float) -> Administration:
    """A one-off dose (effectiveDateTime): start == end."""
    return given(concept, hours, hours)


def patient(*items: Sample | Administration, birth: date | None = ADULT) -> PatientData:
    samples: dict[str, list[Sample]] = {}
    admins: dict[str, list[Administration]] = {}
    for item in items:
        if isinstance(item, Sample):
            samples.setdefault(item.concept, []).append(item)
        else:
            admins.setdefault(item.concept, []).append(item)
    for series in samples.values():
        series.sort(key=lambda s: s.t)
    for adm in admins.values():
        adm.sort(key=lambda a: a.start)
    return PatientData("Patient/p1", birth, samples, admins)


def born_years_ago(years: int, days_after_birthday: int = 0) -> date:
    """Birth date such that AT is `days_after_birthday` days after the `years`-th birthday."""
    return date(AT.year - years, AT.month, AT.day) - timedelta(days=days_after_birthday)


def born_days_ago(days: int) -> date:
    return AT.date() - timedelta(days=days)
