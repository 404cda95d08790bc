"""CDS Hooks feedback (https://cds-hooks.hl7.org/2.0/#feedback): checked when received, counted
for `iectox report feedback`.

A feedback item names a card by its uuid, an `outcome` (accepted | overridden), and for an
override optionally the `overrideReason` (a Coding the card offered, and a comment that is never
read here). The report counts, per card type (what the issuing service shows: grades,
order-risk) and indicator, the cards returned, how many got feedback, and the acceptance and
override rates; then the override reasons by card type. Feedback for a card this service did not
record (another instance's, or older than the table) is counted as `unknown`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from ..fhir.errors import FhirError, Issue
from ..storage.models import CdsCard, CdsFeedback

OUTCOMES = ("accepted", "overridden")


def check_feedback(doc: Any) -> list[dict[str, Any]]:
    """The feedback items of a request body; 400 naming each problem and its path."""
    if not isinstance(doc, dict) or not isinstance(doc.get("feedback"), list):
        raise FhirError(400, [Issue("required", "feedback must be an object with a feedback array", "feedback")])
    issues = []
    for i, item in enumerate(doc["feedback"]):
        path = f"feedback[{i}]"
        if not isinstance(item, dict):
            issues.append(Issue("structure", "a feedback item must be an object", path))
            continue
        if not isinstance(item.get("card"), str) or not item["card"]:
            issues.append(Issue("required", "card (the card's uuid) is required", f"{path}.card"))
        if item.get("outcome") not in OUTCOMES:
            issues.append(Issue("value", "outcome must be accepted or overridden", f"{path}.outcome"))
        reason = item.get("overrideReason")
        if reason is not None and not (isinstance(reason, dict) and isinstance(reason.get("reason"), dict)):
            issues.append(Issue("structure", "overrideReason must be an object with a reason Coding", path))
    if issues:
        raise FhirError(400, issues[:50])
    items: list[dict[str, Any]] = doc["feedback"]
    return items


def _reason_code(item: dict[str, Any]) -> str:
    reason = (item.get("overrideReason") or {}).get("reason") or {}
    code = reason.get("code") if isinstance(reason, dict) else None
    return code if isinstance(code, str) and code else "(none given)"


@dataclass(frozen=True)
class Row:
    card_type: str
    indicator: str
    cards: int
    answered: int  # cards with feedback
    accepted: int
    overridden: int

    def rate(self, n: int) -> str:
        return f"{n / self.answered:.0%}" if self.answered else "-"


@dataclass(frozen=True)
class FeedbackReport:
    rows: tuple[Row, ...]
    reasons: tuple[tuple[str, str, int], ...]  # (card type, reason code, count)


def feedback_report(cards: list[CdsCard], feedback: list[CdsFeedback]) -> FeedbackReport:
    """Counts per card type and indicator; the latest feedback on a card is its outcome."""
    kind = {c.uuid: (c.card_type, c.indicator) for c in cards}
    latest: dict[str, dict[str, Any]] = {}
    for fb in sorted(feedback, key=lambda f: (f.received, f.id or 0)):
        try:
            items = check_feedback(orjson.loads(fb.body))
        except (FhirError, orjson.JSONDecodeError):
            continue  # stored before the check existed: not countable
        for item in items:
            latest[item["card"]] = item
    issued = Counter(kind.values())
    answered: Counter[tuple[str, str]] = Counter()
    outcomes: Counter[tuple[str, str, str]] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    for uuid, item in latest.items():
        key = kind.get(uuid, ("unknown", "-"))
        answered[key] += 1
        outcomes[(*key, item["outcome"])] += 1
        if item["outcome"] == "overridden":
            reasons[(key[0], _reason_code(item))] += 1
    rows = tuple(
        Row(
            t,
            ind,
            issued[(t, ind)],
            answered[(t, ind)],
            outcomes[(t, ind, "accepted")],
            outcomes[(t, ind, "overridden")],
        )
        for t, ind in sorted(set(issued) | set(answered))
    )
    return FeedbackReport(rows, tuple((t, code, n) for (t, code), n in sorted(reasons.items())))


def render(report: FeedbackReport) -> str:
    head = f"{'card type':12} {'indicator':9} {'cards':>6} {'feedback':>8} {'accepted':>9} {'overridden':>10}"
    lines = [head, "-" * len(head)]
    for r in report.rows:
        lines.append(
            f"{r.card_type:12} {r.indicator:9} {r.cards:>6} {r.answered:>8} "
            f"{r.rate(r.accepted):>9} {r.rate(r.overridden):>10}"
        )
    if not report.rows:
        lines.append("(no cards returned and no feedback received)")
    if report.reasons:
        lines += ["", "override reasons", f"{'card type':12} {'reason':24} {'count':>6}"]
        lines += [f"{t:12} {code:24} {n:>6}" for t, code, n in report.reasons]
    return "\n".join(lines)
