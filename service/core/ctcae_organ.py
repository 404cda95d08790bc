"""CTCAE grading of organ toxicity (creatinine, AST and ALT increased), a fact the older CRS
scales read ("grade N organ toxicity").

Source: NCI CTCAE v5.0 (2017) and v4.03 (2010), "Creatinine increased", "Aspartate
aminotransferase increased", "Alanine aminotransferase increased" (docs/scale-sources.md §7).
v5.0 by default, v4.03 by configuration. The baseline is the latest value before
lymphodepletion (scores.lymphodepletion) within the configured look-back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from .concepts import C
from .config import OlderConfig
from .model import Administration, PatientData, Sample
from .model import fmt_time as _fmt_t
from .scores import lymphodepletion

CTCAE_WORST_GRADE = 4  # grade 5 is death

# (lower bound, inclusive?, grade): the grade for ratio r is that of the last row r passes.
Bands = tuple[tuple[float, bool, int], ...]
ORGAN_ULN_BANDS: dict[tuple[str, str], Bands] = {
    # Creatinine increased: ">ULN - 1.5 x ULN" 1; ">1.5 - 3.0 x ULN" 2; ">3.0 - 6.0 x ULN" 3; ">6.0 x ULN" 4.
    ("5.0", "creatinine"): ((1.0, False, 1), (1.5, False, 2), (3.0, False, 3), (6.0, False, 4)),
    ("4.03", "creatinine"): ((1.0, False, 1), (1.5, False, 2), (3.0, False, 3), (6.0, False, 4)),
    # AST/ALT increased (baseline normal): ">ULN - 3.0 x ULN" 1; ">3.0 - 5.0" 2; ">5.0 - 20.0" 3; ">20.0" 4.
    ("5.0", "transaminase"): ((1.0, False, 1), (3.0, False, 2), (5.0, False, 3), (20.0, False, 4)),
    ("4.03", "transaminase"): ((1.0, False, 1), (3.0, False, 2), (5.0, False, 3), (20.0, False, 4)),
}
ORGAN_BASELINE_BANDS: dict[tuple[str, str], Bands] = {
    # v5 creatinine: ">1.5 - 3.0 x baseline" 2; ">3.0 x baseline" 3.
    ("5.0", "creatinine"): ((1.5, False, 2), (3.0, False, 3)),
    # v4.03 creatinine: ">1 - 1.5 x baseline" 1; ">1.5 - 3.0 x baseline" 2; ">3.0 baseline" 3.
    ("4.03", "creatinine"): ((1.0, False, 1), (1.5, False, 2), (3.0, False, 3)),
    # v5 AST/ALT, baseline abnormal: "1.5 - 3.0 x baseline" 1; ">3.0 - 5.0" 2; ">5.0 - 20.0" 3; ">20.0" 4.
    ("5.0", "transaminase"): ((1.5, True, 1), (3.0, False, 2), (5.0, False, 3), (20.0, False, 4)),
}
ORGAN_LABS = ((C.CREATININE, "creatinine"), (C.AST, "transaminase"), (C.ALT, "transaminase"))


def _ratio_grade(ratio: float, bands: Bands) -> int:
    grade = 0
    for low, inclusive, g in bands:
        if ratio > low or (inclusive and ratio == low):
            grade = g
    return grade


@dataclass(frozen=True)
class OrganFacts:
    """The CTCAE grade of one organ in the window (None: unknown, with what it needs)."""

    grade: int | None
    why: str
    refs: tuple[str, ...]
    needs: str
    finding: str | None = None  # the lab value and its ratio, without the CTCAE grade (None: `why`)


def _uln(sample: Sample, concept: str, cfg: OlderConfig) -> tuple[float | None, str]:
    if sample.ref_high is not None:
        return sample.ref_high, "referenceRange"
    uln: dict[str, float | None] = {
        C.CREATININE: cfg.uln_creatinine_mg_dl,
        C.AST: cfg.uln_ast_u_l,
        C.ALT: cfg.uln_alt_u_l,
    }
    configured = uln[concept]
    return configured, "configured ULN"


def _baseline(data: PatientData, concept: str, ld: Administration | None, cfg: OlderConfig) -> Sample | None:
    if ld is None:
        return None
    before = [s for s in data.window(concept, ld.start - cfg.baseline_lookback, ld.start) if s.t < ld.start]
    return before[-1] if before and before[-1].value is not None else None


def _lab_grade(
    data: PatientData, concept: str, kind: str, lo: datetime, at: datetime, ld: Administration | None, cfg: OlderConfig
) -> OrganFacts:
    version = cfg.ctcae_organ_version
    values = [s for s in data.window(concept, lo, at) if s.value is not None]
    if not values:
        return OrganFacts(None, f"no {concept} in the window", (), concept)
    base = _baseline(data, concept, ld, cfg)
    best: OrganFacts | None = None
    for s in values:
        uln, uln_src = _uln(s, concept, cfg)
        if uln is None or uln <= 0:
            return OrganFacts(
                None, f"{concept} {s.shown} without an upper limit of normal", (s.ref,), f"ULN for {concept}"
            )
        v = s.value or 0.0
        ratio = v / uln
        base_ratio = (v / base.value) if base is not None and base.value else None
        bands_base = ORGAN_BASELINE_BANDS.get((version, kind))
        if kind == "transaminase" and base is not None and (base.value or 0.0) > uln and bands_base:
            g = _ratio_grade(base_ratio or 0.0, bands_base)
            rule = f"{base_ratio:.2f} x abnormal baseline {base.shown}"
        else:
            g = _ratio_grade(ratio, ORGAN_ULN_BANDS[(version, kind)])
            rule = f"{ratio:.2f} x ULN {uln:g} ({uln_src})"
            if kind == "creatinine" and base_ratio is not None and bands_base:
                gb = _ratio_grade(base_ratio, bands_base)
                if gb > g:  # both criteria apply; the higher grade is taken (iectox choice)
                    g, rule = gb, f"{base_ratio:.2f} x baseline {base.shown if base else ''}"
        refs = (s.ref,) + ((base.ref,) if base is not None and "baseline" in rule else ())
        finding = f"{concept} {s.shown} at {_fmt_t(s.t)} = {rule}"
        why = f"{finding} -> CTCAE v{version} grade {g}"
        if best is None or (best.grade or 0) < g:
            best = OrganFacts(g, why, refs, "", finding)
    assert best is not None
    if base is None and best.grade:
        best = OrganFacts(best.grade, best.why + " (no pre-lymphodepletion baseline)", best.refs, "", best.finding)
    return best


def organ_facts(data: PatientData, lo: datetime, at: datetime, cfg: OlderConfig) -> Mapping[str, OrganFacts]:
    """The organ facts of [lo, at]: "creatinine" and "transaminase". They read only the window's
    lab values and the patient's baseline, so the same values give the same facts: made once per
    distinct window (the course asks every hour; labs come about daily)."""
    key = ("organ", cfg, tuple(data.span(concept, lo, at) for concept, _ in ORGAN_LABS))
    return data.once(key, lambda: MappingProxyType(_organ_facts(data, lo, at, cfg)))


def _organ_facts(data: PatientData, lo: datetime, at: datetime, cfg: OlderConfig) -> dict[str, OrganFacts]:
    out: dict[str, OrganFacts] = {}
    ld = lymphodepletion(data)
    for kind in ("creatinine", "transaminase"):
        parts = [_lab_grade(data, c, k, lo, at, ld, cfg) for c, k in ORGAN_LABS if k == kind]
        known = [p for p in parts if p.grade is not None]
        unknown = [p for p in parts if p.grade is None]
        worst = max(known, key=lambda p: p.grade or 0) if known else None
        # Transaminitis is the worse of AST and ALT: one unknown keeps it unknown below grade 4.
        if unknown and not (worst is not None and worst.grade == CTCAE_WORST_GRADE):
            refs = tuple(r for p in parts for r in p.refs)
            out[kind] = OrganFacts(None, "; ".join(p.why for p in unknown), refs, " / ".join(p.needs for p in unknown))
        else:
            assert worst is not None
            out[kind] = worst
    return out
