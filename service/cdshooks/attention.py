"""Cards that respect attention: when a hook's card stays quiet, what it showed, its override reasons.

A site keeps a hook's cards quiet (Settings.cds_quiet, per hook):
- "grade-0": ASTCT CRS and ICANS are both graded 0. An indeterminate grade is never quiet: it
  says data are missing, which is worth a look;
- "unchanged": no scale's grade (nor an indeterminate grade's floor) changed since the last
  answer to the same hook for the same patient, card or quiet (so a grade 3 that comes back after
  a quiet grade 0 is a change, and shown).
Alert fatigue makes clinicians ignore decision support; a card that repeats itself is the cause.
No database here: service.py reads and records the last answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..app.evaluate import Evaluation
from ..core.astct import CRS_METHOD, ICANS_METHOD
from ..core.model import GradeResult

GRADE_0, UNCHANGED = "grade-0", "unchanged"

# Card.overrideReasons (CDS Hooks 2.0): why a clinician dismissed a card; counted by
# `iectox report feedback`. Codes of this service's own CodeSystem.
OVERRIDE_REASONS: tuple[tuple[str, str], ...] = (
    ("already-managed", "Already aware; being managed"),
    ("not-applicable", "Not applicable to this patient"),
    ("data-wrong", "The inputs are wrong or out of date"),
    ("too-frequent", "Shown too often"),
)


def override_reasons(canonical_base: str) -> list[dict[str, Any]]:
    system = f"{canonical_base.rstrip('/')}/CodeSystem/override-reason"
    return [{"system": system, "code": code, "display": display} for code, display in OVERRIDE_REASONS]


def _state(r: GradeResult) -> str:
    if r.grade is not None:
        return str(r.grade)
    return f"indeterminate>={r.floor}" if r.floor else "indeterminate"


def shown_grades(ev: Evaluation) -> str:
    """What a card of this evaluation shows, as one comparable string (every scale, in order)."""
    return ";".join(f"{r.method}={_state(r)}" for r in ev.results)


def quiet_reason(rules: Sequence[str], ev: Evaluation, last_shown: str | None) -> str | None:
    """Which rule keeps the card quiet (None: show it). `last_shown`: shown_grades of the last
    answer to this hook for this patient (None: none yet)."""
    by = {r.method: r.grade for r in ev.results}
    if GRADE_0 in rules and by.get(CRS_METHOD) == 0 and by.get(ICANS_METHOD) == 0:
        return GRADE_0
    if UNCHANGED in rules and last_shown is not None and last_shown == shown_grades(ev):
        return UNCHANGED
    return None
