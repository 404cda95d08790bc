"""The vasopressor run facts computed in one sweep (issue 12: drips charted as hourly events are
hundreds of administrations) give exactly what the straightforward definitions give: the longest
continuous run and the high-dose run, on random sets of administrations (overlapping, touching,
instantaneous, ongoing, without a rate, at rate 0), against the definitions kept here as oracles."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from service.core.concepts import C
from service.core.config import VASOPRESSIN, HighDoseRule
from service.core.facts import _high_dose, _intervals, _longest_run
from service.core.model import Administration
from tests.test_older_scales import HIGH_DOSE as RULE  # Lee 2014 Table 2, unverified: a test configuration

T0 = datetime(2026, 1, 5, 8, tzinfo=UTC)
AGENTS = (C.NOREPINEPHRINE, C.EPINEPHRINE, C.PHENYLEPHRINE, C.DOPAMINE, VASOPRESSIN)


def longest_run_oracle(
    admins: list[Administration], lo: datetime, at: datetime
) -> tuple[timedelta, datetime | None, tuple[str, ...]]:
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


def high_dose_oracle(
    admins: list[Administration], lo: datetime, at: datetime, rule: HighDoseRule
) -> tuple[bool | None, tuple[str, ...], list[tuple[datetime, datetime, tuple[str, ...]]]]:
    """(high, refs, every high-dose run): every span against every cut, as first written."""
    spans = [s for s in _intervals(admins, at) if s[1] > s[0]]
    cuts = sorted({t for s, e, _ in spans for t in (s, e)})
    runs: list[tuple[datetime, datetime, tuple[str, ...]]] = []
    unknown: list[str] = []
    run_start: datetime | None = None
    run_end = at
    run_refs: list[str] = []
    for a, b in pairwise(cuts):
        running = [x for s, e, x in spans if s <= a and e >= b and (x.rate is None or x.rate > 0)]
        rates: dict[str, float] = {}
        missing = [x for x in running if x.rate is None]
        for x in running:
            if x.rate is not None:
                rates[x.concept] = max(rates.get(x.concept, 0.0), x.rate)
        if missing and b >= lo:
            unknown.append(missing[0].ref)
        high = rule.is_high(rates)[0] if rates and not missing else False
        if high:
            if run_start is None:
                run_start, run_refs = a, []
            run_refs += [x.ref for x in running]
            run_end = b
        elif run_start is not None:
            runs.append((run_start, run_end, tuple(dict.fromkeys(run_refs))))
            run_start = None
    if run_start is not None:
        runs.append((run_start, run_end, tuple(dict.fromkeys(run_refs))))
    need = timedelta(hours=rule.sustained_hours)
    for s, e, refs in runs:
        if e >= lo and e - s >= need:
            return True, refs, runs
    if unknown:
        return None, tuple(unknown), runs
    return False, (), runs


def random_admins(rng: random.Random, n: int) -> list[Administration]:
    out = []
    for i in range(n):
        start = T0 + timedelta(minutes=30 * rng.randrange(0, 200))
        length = rng.choice([0, 30, 60, 60, 60, 120, 300, None])  # instant, hourly events, long, ongoing
        end = None if length is None else start + timedelta(minutes=length)
        rate = rng.choice([None, 0.0, 1.0, 5.0, 15.0, 25.0, 40.0])
        agent = rng.choice(AGENTS[:2]) if rng.random() < 0.8 else rng.choice(AGENTS)
        out.append(Administration(agent, start, end, f"MedicationAdministration/m{i}", rate=rate))
    return out


@pytest.mark.parametrize("seed", range(60))
def test_sweep_equals_the_definitions(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311  (test data, not a secret)
    admins = random_admins(rng, rng.choice([1, 3, 10, 40, 120]))
    for _ in range(8):
        at = T0 + timedelta(minutes=30 * rng.randrange(0, 220))
        lo = at - timedelta(hours=24)
        assert _longest_run(admins, lo, at) == longest_run_oracle(admins, lo, at)
        high, _why, refs = _high_dose(admins, lo, at, RULE)
        expected_high, expected_refs, _ = high_dose_oracle(admins, lo, at, RULE)
        assert (high, refs) == (expected_high, expected_refs)
