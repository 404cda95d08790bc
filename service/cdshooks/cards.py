"""CDS Hooks 2.0 cards (https://cds-hooks.hl7.org/2.0/) from an Evaluation.

No HTTP and no database here: service.py fetches and evaluates, this module turns an
Evaluation into cards. A card states the current ASTCT grades; an indeterminate grade names the
missing data and never reads as "no CRS".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..app.evaluate import Evaluation
from ..core.astct import CRS_METHOD, ICANS_METHOD
from ..core.concepts import C
from ..core.model import GradeResult
from ..core.scores import PRODUCT_RATES

PATIENT_VIEW = "iectox-patient-view"
ORDER_SELECT = "iectox-order-select"
ORDER_SIGN = "iectox-order-sign"
SUMMARY_MAX = 139  # "< 140 characters" (CDS Hooks 2.0 Card.summary)
ORDER_CONCEPTS: dict[str, str] = {
    C.CART_INFUSION: "a CAR T-cell product",
    C.TOCILIZUMAB: "tocilizumab",
    C.DEXAMETHASONE: "a corticosteroid (dexamethasone)",
    C.METHYLPREDNISOLONE: "a corticosteroid (methylprednisolone)",
}


class Order(NamedTuple):
    """A selected draft order that matters here: its concept, product (CAR T) and reference."""

    concept: str
    product: str | None
    ref: str


def _grade_text(r: GradeResult | None) -> str:
    if r is None or r.grade is None:
        floor = r.floor if r is not None else None
        return f"indeterminate (>= grade {floor})" if floor else "indeterminate"
    return f"grade {r.grade}"


def indicator(results: list[GradeResult | None]) -> str:
    """info below grade 2, warning at 2, critical at >= 3; unknown data are at least a warning,
    and an indeterminate grade counts with the grade the data present already show."""
    grades = [g for r in results if r is not None for g in (r.grade, r.floor) if g is not None]
    worst = max(grades, default=0)
    if worst >= 3:
        return "critical"
    if worst == 2 or any(r is None or r.grade is None for r in results):
        return "warning"
    return "info"


def _grade_section(title: str, r: GradeResult | None) -> list[str]:
    if r is None:
        return [f"**{title}: indeterminate** (not evaluated)."]
    if r.grade is None:
        return [
            f"**{title}: indeterminate** ({r.scale}, at {r.at.isoformat(timespec='minutes')}).",
            f"Cannot be graded without: {', '.join(r.missing) or 'more data'}. This is not grade 0.",
            r.verdict,
        ]
    lines = [f"**{title}: grade {r.grade}** ({r.scale}, at {r.at.isoformat(timespec='minutes')}).", r.verdict]
    if r.basis:
        lines.append("Deciding inputs: " + ", ".join(f"`{ref}`" for ref in r.basis[:6]))
    return lines


@dataclass(frozen=True)
class CardContext:
    patient_id: str
    course_url: str  # the patient's course as FHIR Parameters
    app_url: str  # the clinician app's SMART launch URL (the EHR adds iss and launch)
    override_reasons: tuple[dict[str, Any], ...] = ()  # Codings a clinician may pick to dismiss
    source_label: str = "iectox"


def _scores_section(ev: Evaluation) -> list[str]:
    lines = []
    for s in ev.scores:
        if s.value is not None:
            lines.append(f"- {s.method} ({s.label}): {s.value:.3g}")
        for p in s.predictions:
            if p.probability is not None and s.method == "product-baseline":
                lines.append(f"- {s.method}: {p.text} {p.probability:.0%}")
        if s.missing and s.method in ("easix", "product-baseline") and s.label in ("pre-lymphodepletion", "infusion"):
            lines.append(f"- {s.method} ({s.label}): not computable, missing {', '.join(s.missing)}")
    return ["**Pre-infusion and baseline risk:**", *lines] if lines else []


def _other_scales(ev: Evaluation) -> str:
    others = [r for r in ev.results if r.method not in (CRS_METHOD, ICANS_METHOD)]
    return "**Other scales (current):** " + "; ".join(f"{r.method} {_grade_text(r)}" for r in others)


def _masked_note(crs: GradeResult | None) -> list[str]:
    if crs is not None and crs.fever_masked:
        return [
            "**Masked fever:** fever was treated (antipyretic or anti-cytokine therapy), so it is no longer "
            "required; the grade is driven by hypotension and hypoxia (ASTCT 2019)."
        ]
    return []


def _card(summary: str, detail: list[str], ind: str, ctx: CardContext, **extra: Any) -> dict[str, Any]:
    return {
        "uuid": str(uuid.uuid4()),
        "summary": summary[:SUMMARY_MAX],
        "detail": "\n\n".join(detail),
        "indicator": ind,
        "source": {"label": ctx.source_label},
        "links": [
            {"label": "CRS/ICANS course of this patient (FHIR Parameters)", "url": ctx.course_url, "type": "absolute"},
            # A SMART link: the EHR launches the app with its own iss and launch context.
            {"label": "Open the CRS/ICANS course (iectox app)", "url": ctx.app_url, "type": "smart"},
        ],
        **({"overrideReasons": list(ctx.override_reasons)} if ctx.override_reasons else {}),
        **extra,
    }


def _current(ev: Evaluation) -> tuple[GradeResult | None, GradeResult | None]:
    by = {r.method: r for r in ev.results}
    return by.get(CRS_METHOD), by.get(ICANS_METHOD)


def patient_view_cards(ev: Evaluation, ctx: CardContext) -> list[dict[str, Any]]:
    crs, icans = _current(ev)
    summary = f"CRS {_grade_text(crs)}, ICANS {_grade_text(icans)} (ASTCT 2019)"
    detail = [
        *_grade_section("CRS", crs),
        *_masked_note(crs),
        *_grade_section("ICANS", icans),
        _other_scales(ev),
        *_scores_section(ev),
    ]
    return [_card(summary, detail, indicator([crs, icans]), ctx)]


def order_select_cards(ev: Evaluation, ctx: CardContext, orders: list[Order]) -> list[dict[str, Any]]:
    crs, icans = _current(ev)
    what = ", ".join(dict.fromkeys(ORDER_CONCEPTS[c] for c, _, _ in orders))
    detail = [f"Order selected: {what}."]
    head = f"CRS {_grade_text(crs)}, ICANS {_grade_text(icans)}"
    for concept, product, _ in orders:
        if concept != C.CART_INFUSION:
            continue
        rows = [r for r in PRODUCT_RATES if r.product == product]
        if ev.indications:
            rows = [r for r in rows if r.indication in ev.indications] or rows
        if not rows:
            detail.append("Product baseline: the product is not in the published table (Brudno 2024, Table 1).")
            continue
        detail.append("**Product baseline (pivotal trials; Brudno JN et al., JAMA 2024, Table 1):**")
        detail += [
            f"- {r.product}, {r.population}: any-grade CRS {r.crs:.0%}, neurotoxicity {r.neuro:.0%}" for r in rows
        ]
        if len(rows) == 1:
            head = f"{rows[0].product} baseline CRS {rows[0].crs:.0%}; {head}"
    detail += [*_grade_section("CRS", crs), *_grade_section("ICANS", icans)]
    suggestion = {
        "label": "Order ICE assessment (ASTCT 2019 encephalopathy screen)",
        "uuid": str(uuid.uuid4()),
        "actions": [
            {
                "type": "create",
                "description": "Draft ServiceRequest for an ICE assessment",
                "resource": {
                    "resourceType": "ServiceRequest",
                    "status": "draft",
                    "intent": "proposal",
                    "code": {"text": "Immune effector cell-associated encephalopathy (ICE) assessment"},
                    "subject": {"reference": f"Patient/{ctx.patient_id}"},
                },
            }
        ],
    }
    return [
        _card(
            f"{head} (ASTCT 2019)",
            detail,
            indicator([crs, icans]),
            ctx,
            suggestions=[suggestion],
            selectionBehavior="any",
        )
    ]
