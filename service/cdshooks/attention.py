"""Cards that respect attention: when a hook's card stays quiet, what it showed, its override reasons.

A site keeps a hook's cards quiet (Settings.cds_quiet, per hook):
- "grade-0": ASTCT CRS and ICANS are both graded 0. An indeterminate grade is never quiet: it
  says data are missing, which is worth a look;
- "unchanged": nothing the card would show changed (no scale's grade, nor an indeterminate
  grade's floor; for an order hook, nor the orders) since the last answer to the same hook for
  the same patient and user, card or quiet (so a grade 3 that comes back after a quiet grade 0
  is a change, and shown), and this user was shown the card less than
  `cds_quiet_repeat_hours` ago. A critical card (grade 3 or more, or proven at least 3) is never
  kept quiet by this rule: a clinician who missed it (a timed-out hook, another shift) sees it.
Alert fatigue makes clinicians ignore decision support; a card that repeats itself is the cause.
No database here: service.py reads and records the last answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..app.evaluate import Evaluation
from ..core.astct import CRS_METHOD, ICANS_METHOD
from ..core.model import GradeResult
from ..fhir.terminology import OVERRIDE_REASONS  # Card.overrideReasons: a CodeSystem of its own
from .cards import Order, indicator

GRADE_0, UNCHANGED = "grade-0", "unchanged"


def override_reasons(canonical_base: str) -> list[dict[str, Any]]:
    system = f"{canonical_base.rstrip('/')}/CodeSystem/override-reason"
    return [{"system": system, "code": code, "display": display} for code, display in OVERRIDE_REASONS]


def _state(r: GradeResult) -> str:
    if r.grade is not None:
        return str(r.grade)
    return f"indeterminate>={r.floor}" if r.floor else "indeterminate"


def shown_grades(ev: Evaluation, orders: Sequence[Order] = ()) -> str:
    """What a card of this evaluation shows, as one comparable string: every scale's grade, in
    order, and the orders it answers (an order hook's card is about them)."""
    state = ";".join(f"{r.method}={_state(r)}" for r in ev.results)
    if orders:
        state += "|orders=" + ",".join(sorted(f"{o.concept}:{o.product or ''}" for o in orders))
    return state


@dataclass(frozen=True)
class Last:
    """The last answer to this hook for this patient and user."""

    state: str
    shown: datetime | None  # when a card was last returned to this user (None: never)


def quiet_reason(
    rules: Sequence[str], ev: Evaluation, state: str, last: Last | None, now: datetime, repeat: timedelta
) -> str | None:
    """Which rule keeps the card quiet (None: show it); `state` is shown_grades of this answer."""
    by = {r.method: r for r in ev.results}
    crs, icans = by.get(CRS_METHOD), by.get(ICANS_METHOD)
    if GRADE_0 in rules and crs is not None and icans is not None and crs.grade == 0 and icans.grade == 0:
        return GRADE_0
    if (
        UNCHANGED in rules
        and last is not None
        and last.state == state
        and last.shown is not None
        and now - last.shown < repeat
        and indicator([crs, icans]) != "critical"
    ):
        return UNCHANGED
    return None
