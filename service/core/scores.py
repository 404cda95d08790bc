"""Published risk scores before and after infusion (clinical-rules.md §3).

Every number here is quoted, with its source, in docs/score-sources.md. Scores whose numbers
could not be verified there (CAR-HEMATOTOX points, Hay 2017, ICAHT) are not computed.
Missing inputs give an indeterminate result naming them, never a value.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .concepts import C
from .model import UNKNOWN_DRUG, Administration, LeftOut, PatientData, Sample
from .model import fmt_time as _t

# --- results -------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    outcome: str  # project outcome code
    text: str
    probability: float | None = None  # a fraction 0-1 (docs/output-contract.md)
    qualitative: str | None = None  # risk-probability code, only where a verified cut-off exists
    relative_risk: float | None = None
    rationale: str = ""


@dataclass(frozen=True)
class ScoreResult:
    method: str
    citation: str
    at: datetime  # the time point (occurrenceDateTime)
    label: str  # e.g. "pre-lymphodepletion", "day +1"
    value: float | None  # the score; None when indeterminate or when the score is not a number
    predictions: tuple[Prediction, ...]
    basis: tuple[str, ...]
    missing: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()  # references of left-out inputs that could have changed it

    @property
    def indeterminate(self) -> bool:
        return bool(self.missing)


@dataclass(frozen=True)
class ScoreConfig:
    # A time point uses the value nearest to it within +/- this, never after `at`.
    tolerance: timedelta = timedelta(hours=24)
    # "Before lymphodepletion": the latest value in [LD - lookback, LD), never at or after LD.
    pre_ld_lookback: timedelta = timedelta(hours=72)


# --- anchoring time points ----------------------------------------------------------------

# Lymphodepletion (fludarabine/cyclophosphamide) runs over the days before infusion; an earlier
# cyclophosphamide (bridging, a prior regimen) must not become "lymphodepletion".
LD_COURSE_BEFORE_INFUSION = timedelta(days=14)
LD_COURSE_GAP = timedelta(days=7)


def lymphodepletion(data: PatientData) -> Administration | None:
    """The first administration of the lymphodepletion course that precedes the CAR T infusion:
    within 14 days before day 0, or without day 0, the last run of doses no more than 7 days apart."""
    given = data.given(C.LYMPHODEPLETION)
    day0 = data.first_event(C.CART_INFUSION)
    if day0 is not None:
        course = [a for a in given if day0.start - LD_COURSE_BEFORE_INFUSION <= a.start <= day0.start]
        return course[0] if course else None
    if not given:
        return None
    first = given[-1]
    for a in reversed(given[:-1]):
        if first.start - a.start > LD_COURSE_GAP:
            break
        first = a
    return first


# --- choosing lab values ----------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Where a time point may take its values from: [lo, hi], nearest to `target`."""

    target: datetime
    lo: datetime
    hi: datetime
    latest: bool = False  # pre-lymphodepletion: the latest value, not the nearest

    def pick(self, series: list[Sample]) -> Sample | None:
        times = [s.t for s in series]
        i, j = bisect_left(times, self.lo), bisect_right(times, self.hi)
        candidates = [s for s in series[i:j] if s.value is not None]
        if not candidates:
            return None
        if self.latest:
            return candidates[-1]
        return min(candidates, key=lambda s: abs((s.t - self.target).total_seconds()))


def around(target: datetime, at: datetime, cfg: ScoreConfig) -> Window:
    return Window(target, target - cfg.tolerance, min(target + cfg.tolerance, at))


def before_lymphodepletion(ld: datetime, at: datetime, cfg: ScoreConfig) -> Window:
    # A lab drawn at or after the start of lymphodepletion is never "pre".
    return Window(ld, ld - cfg.pre_ld_lookback, min(ld - timedelta(microseconds=1), at), latest=True)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


# --- EASIX family (Luft 2017; Korell 2022; Pennisi 2021) ------------------------------

EASIX_CITATION = (
    "EASIX = LDH (U/L) x creatinine (mg/dL) / platelets (10^9/L) (Luft T et al., Lancet Haematol "
    "2017;4:e414-23); EASIX-pre cut-off > 4.67 (Korell F et al., Front Immunol 2022, "
    "doi:10.3389/fimmu.2022.877477)"
)
PENNISI = "Pennisi M et al., Blood Adv 2021;5:3397-3406, doi:10.1182/bloodadvances.2020003885"
M_EASIX_CITATION = f"m-EASIX = LDH (U/L) x CRP (mg/dL) / platelets (10^9/L) ({PENNISI})"
S_EASIX_CITATION = f"s-EASIX = LDH (U/L) / platelets (10^9/L) ({PENNISI})"

# Korell 2022: "An EASIX-pre cutoff >4.67 ... associated with a 4.3-fold increased odds ratio
# of severe CRS/ICANS in the independent cohort" (grade >= 3 CRS and/or ICANS).
EASIX_PRE_CUTOFF = 4.67
EASIX_PRE_OR = 4.3
SEVERE_CRS_ICANS = "severe-crs-or-icans"
SEVERE_CRS_ICANS_TEXT = "Grade >= 3 CRS and/or ICANS"
# Pennisi 2021: m-EASIX AUC for severe (grade >= 3) CRS by time point; no cut-off published.
M_EASIX_AUC = {"lymphodepletion": "80.4%", "day -1": "73.0%", "day +1": "75.4%"}
PENNISI_POPULATION = "118 adults: 53 B-ALL (1928z CAR T) and 65 DLBCL (axi-cel or tisa-cel)"


@dataclass(frozen=True)
class Formula:
    method: str
    citation: str
    inputs: tuple[str, ...]  # concepts, canonical units: ldh U/L, creatinine/crp mg/dL, platelets 10^9/L
    compute: Callable[[dict[str, float]], float]


EASIX = Formula(
    "easix",
    EASIX_CITATION,
    (C.LDH, C.CREATININE, C.PLATELETS),
    lambda v: v[C.LDH] * v[C.CREATININE] / v[C.PLATELETS],
)
M_EASIX = Formula(
    "m-easix", M_EASIX_CITATION, (C.LDH, C.CRP, C.PLATELETS), lambda v: v[C.LDH] * v[C.CRP] / v[C.PLATELETS]
)
S_EASIX = Formula("s-easix", S_EASIX_CITATION, (C.LDH, C.PLATELETS), lambda v: v[C.LDH] / v[C.PLATELETS])


@dataclass
class _Inputs:
    values: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def shown(self) -> str:
        return ", ".join(f"{s.concept} {s.shown} at {_t(s.t)}" for s in self.samples)


def _gather(data: PatientData, concepts: tuple[str, ...], window: Window) -> _Inputs:
    got = _Inputs()
    for c in concepts:
        s = window.pick(data.series(c))
        if s is None or s.value is None:
            got.missing.append(c)
            continue
        got.values[c] = s.value
        got.samples.append(s)
    return got


# --- inputs left out (lenient handling) ------------------------------------------------
# A score is indeterminate, naming them, when a left-out input could have changed it: a value
# of one of its inputs the time point could have picked (docs/clinical-choices.md, "Scores").


def _could_pick(row: LeftOut, window: Window, picked: Sample | None) -> bool:
    """Whether the left-out row could have been the value the window picks instead of `picked`."""
    if row.t is None:
        return True  # its time is unknown: it could be anywhere
    if not window.lo <= row.t <= window.hi:
        return False
    if picked is None:
        return True
    if window.latest:
        return row.t >= picked.t
    return abs((row.t - window.target).total_seconds()) <= abs((picked.t - window.target).total_seconds())


def _left_out_values(data: PatientData, window: Window, picked: dict[str, Sample | None]) -> list[LeftOut]:
    return [r for r in data.left_out if r.concept in picked and _could_pick(r, window, picked[r.concept])]


def _left_out_anchors(data: PatientData, anchors: dict[str, datetime]) -> list[LeftOut]:
    """Left-out events earlier than the recorded lymphodepletion or day 0 (concept -> its start)
    that place a time point: they would move it. An unresolved drug could be either."""
    out = []
    for r in data.left_out:
        if r.concept in anchors:
            start = anchors[r.concept]
        elif r.concept == UNKNOWN_DRUG and anchors:
            start = max(anchors.values())
        else:
            continue
        if r.t is None or r.t < start:
            out.append(r)
    return out


def left_out_missing(rows: list[LeftOut]) -> tuple[str, ...]:
    """`missing` entries of the left-out rows, in the form the grades use."""
    return tuple(f"{r.concept} ({r.ref}: left out)" for r in rows)


def _left_out_text(rows: list[LeftOut]) -> str:
    return "input left out that could change it: " + "; ".join(f"{r.ref} at {r.path} ({r.reason})" for r in rows)


def _formula_result(
    f: Formula,
    data: PatientData,
    window: Window,
    label: str,
    prediction: Callable[[float | None], Prediction],
    anchors: dict[str, datetime] | None = None,
) -> ScoreResult:
    got = _gather(data, f.inputs, window)
    span = f"values from {_t(window.lo)} to {_t(window.hi)}"
    if data.left_out:
        picked: dict[str, Sample | None] = dict.fromkeys(f.inputs)
        picked.update({s.concept: s for s in got.samples})
        rows = _left_out_values(data, window, picked) + _left_out_anchors(data, anchors or {})
        if rows:
            p = prediction(None)
            text = f"Indeterminate at {label}: {_left_out_text(rows)} ({span}). {p.rationale}"
            missing = (*got.missing, *left_out_missing(rows))
            left_out = tuple(r.ref for r in rows)
            preds = (_with(p, text),)
            return ScoreResult(f.method, f.citation, window.target, label, None, preds, (), missing, left_out)
    if got.missing or got.values.get(C.PLATELETS) == 0:
        missing = tuple(got.missing) or ("platelets (non-zero)",)
        p = prediction(None)
        text = f"Indeterminate at {label}: no {', '.join(missing)} ({span}). {p.rationale}"
        return ScoreResult(f.method, f.citation, window.target, label, None, (_with(p, text),), (), missing)
    value = f.compute(got.values)
    p = prediction(value)
    text = f"{f.method} {_fmt(value)} at {label} from {got.shown()}. {p.rationale}"
    return ScoreResult(
        f.method, f.citation, window.target, label, value, (_with(p, text),), tuple(s.ref for s in got.samples)
    )


def _with(p: Prediction, rationale: str) -> Prediction:
    return Prediction(p.outcome, p.text, p.probability, p.qualitative, p.relative_risk, rationale)


def _easix_pre_prediction(value: float | None) -> Prediction:
    if value is None:
        return Prediction(SEVERE_CRS_ICANS, SEVERE_CRS_ICANS_TEXT, rationale="Korell 2022 cut-off not applied.")
    high = value > EASIX_PRE_CUTOFF
    why = (
        f"Korell 2022: EASIX-pre > {EASIX_PRE_CUTOFF:g} gave OR {EASIX_PRE_OR:g} for grade >= 3 CRS and/or ICANS "
        f"(CD19 CAR T; validation cohort of 121 patients); {_fmt(value)} is "
        f"{'above' if high else 'not above'} the cut-off: {'high' if high else 'low'} risk."
    )
    return Prediction(SEVERE_CRS_ICANS, SEVERE_CRS_ICANS_TEXT, qualitative="high" if high else "low", rationale=why)


def _easix_point_prediction(_: float | None) -> Prediction:
    why = "No verified cut-off outside the pre-lymphodepletion time point (Korell 2022): value only, no category."
    return Prediction(SEVERE_CRS_ICANS, SEVERE_CRS_ICANS_TEXT, rationale=why)


def _pennisi_prediction(method: str, label: str) -> Callable[[float | None], Prediction]:
    def make(_: float | None) -> Prediction:
        auc = M_EASIX_AUC.get(label)
        if label == "day +3":
            perf = "m-EASIX at day +3 also discriminated severe ICANS (AUC not verified)"
            outcome = (SEVERE_CRS_ICANS, SEVERE_CRS_ICANS_TEXT)
        else:
            perf = f"m-EASIX AUC for severe CRS at {label}: {auc}" if auc else "AUC at this time point not verified"
            outcome = ("severe-crs", "Grade >= 3 CRS")
        if method != "m-easix":
            perf += f" ({method} AUC per time point not verified)"
        why = (
            f"Pennisi 2021 ({PENNISI_POPULATION}): {perf}; the three EASIX formulas performed similarly. "
            "No verified cut-off: value only, no risk category."
        )
        return Prediction(*outcome, rationale=why)

    return make


def easix_scores(data: PatientData, at: datetime, cfg: ScoreConfig) -> list[ScoreResult]:
    """EASIX before lymphodepletion (with the Korell cut-off) and at every LDH time point."""
    out: list[ScoreResult] = []
    ld = lymphodepletion(data)
    if ld is None:
        missing = (C.LYMPHODEPLETION,)
        p = _easix_pre_prediction(None)
        why = "Indeterminate: no lymphodepletion recorded, so there is no pre-lymphodepletion time point."
        out.append(ScoreResult("easix", EASIX_CITATION, at, "pre-lymphodepletion", None, (_with(p, why),), (), missing))
    elif ld.start <= at:
        window = before_lymphodepletion(ld.start, at, cfg)
        anchors = _ld_anchors(ld, data.first_event(C.CART_INFUSION))
        out.append(_formula_result(EASIX, data, window, "pre-lymphodepletion", _easix_pre_prediction, anchors))
    seen: set[datetime] = set()
    for s in data.series(C.LDH):
        if s.t > at:
            break
        if ld is not None and s.t < ld.start and ld.start <= at:
            continue  # before lymphodepletion: reported once, as EASIX-pre
        if s.t in seen:
            continue  # two LDH results at one instant are one time point (one RiskAssessment id)
        seen.add(s.t)
        result = _formula_result(EASIX, data, around(s.t, at, cfg), f"{_t(s.t)}", _easix_point_prediction)
        # "The value at each time point that has its inputs"; one a left-out input could change is named.
        if not result.indeterminate or result.left_out:
            out.append(result)
    for row in data.left_out:  # a time point whose LDH was left out: indeterminate, named
        if row.concept == C.LDH and row.t is not None and row.t <= at and row.t not in seen:
            if ld is not None and row.t < ld.start <= at:
                continue
            seen.add(row.t)
            p = _easix_point_prediction(None)
            text = f"Indeterminate at {_t(row.t)}: {_left_out_text([row])}. {p.rationale}"
            preds = (_with(p, text),)
            named = left_out_missing([row])
            out.append(ScoreResult("easix", EASIX_CITATION, row.t, _t(row.t), None, preds, (), named, (row.ref,)))
    return out


def pennisi_scores(data: PatientData, at: datetime, cfg: ScoreConfig) -> list[ScoreResult]:
    """m-EASIX and s-EASIX at lymphodepletion, day -1, day +1 and day +3 (Pennisi 2021)."""
    ld = lymphodepletion(data)
    day0 = data.first_event(C.CART_INFUSION)
    # (label, window, the event that places it, the recorded events a left-out earlier one would move)
    points: list[tuple[str, Window | None, str, dict[str, datetime]]] = [
        (
            "lymphodepletion",
            before_lymphodepletion(ld.start, at, cfg) if ld else None,
            C.LYMPHODEPLETION,
            _ld_anchors(ld, day0) if ld else {},
        ),
    ]
    if day0 is None:  # one indeterminate result for the three infusion-relative points
        points.append(("day -1, +1 and +3", None, C.CART_INFUSION, {}))
    else:
        for label, days in (("day -1", -1), ("day +1", 1), ("day +3", 3)):
            window = around(day0.start + timedelta(days=days), at, cfg)
            points.append((label, window, C.CART_INFUSION, {C.CART_INFUSION: day0.start}))
    out: list[ScoreResult] = []
    for f in (M_EASIX, S_EASIX):
        for label, maybe_window, anchor, anchors in points:
            if maybe_window is None:
                p = _pennisi_prediction(f.method, label)(None)
                why = f"Indeterminate at {label}: no {anchor} recorded to place the time point."
                out.append(ScoreResult(f.method, f.citation, at, label, None, (_with(p, why),), (), (anchor,)))
            elif maybe_window.target <= at:  # time points still in the future are not reported
                prediction = _pennisi_prediction(f.method, label)
                out.append(_formula_result(f, data, maybe_window, label, prediction, anchors))
    return out


def _ld_anchors(ld: Administration, day0: Administration | None) -> dict[str, datetime]:
    """What places a pre-lymphodepletion point: the course's first dose, and day 0, which decides
    which course is the lymphodepletion (lymphodepletion())."""
    return {C.LYMPHODEPLETION: ld.start, **({C.CART_INFUSION: day0.start} if day0 else {})}


# --- Product baseline (seed 003, Brudno, Maus & Hinrichs, JAMA 2024, Table 1) ---------------

PRODUCT_CITATION = (
    "Pivotal-trial incidence of any-grade CRS and neurologic toxicity, Brudno JN, Maus MV, Hinrichs CS, "
    "JAMA 2024, Table 1"
)


@dataclass(frozen=True)
class ProductRate:
    product: str
    indication: str
    population: str
    crs: float  # fraction 0-1
    neuro: float


# Any-grade CRS / neurologic toxicity (%) from the trials leading to approval (seed 003 Table 1,
# every row checked in docs/score-sources.md §7). The seed notes the CRS rates come from
# different grading scales.
PRODUCT_RATES: tuple[ProductRate, ...] = (
    ProductRate("tisagenlecleucel", "b-all", "pediatric/young adult B-ALL", 0.77, 0.39),
    ProductRate("tisagenlecleucel", "lbcl", "LBCL", 0.57, 0.20),
    ProductRate("tisagenlecleucel", "fl", "FL", 0.49, 0.37),
    ProductRate("axicabtagene-ciloleucel", "lbcl", "LBCL", 0.93, 0.64),
    ProductRate("axicabtagene-ciloleucel", "fl", "FL", 0.78, 0.56),
    ProductRate("brexucabtagene-autoleucel", "mcl", "MCL", 0.91, 0.63),
    ProductRate("brexucabtagene-autoleucel", "b-all", "adult B-ALL", 0.89, 0.60),
    ProductRate("lisocabtagene-maraleucel", "lbcl", "LBCL", 0.42, 0.30),
    ProductRate("lisocabtagene-maraleucel", "cll", "CLL", 0.85, 0.45),
    ProductRate("lisocabtagene-maraleucel", "fl", "FL", 0.58, 0.15),
    ProductRate("lisocabtagene-maraleucel", "mcl", "MCL", 0.61, 0.31),
    ProductRate("idecabtagene-vicleucel", "mm", "MM", 0.84, 0.18),
    ProductRate("ciltacabtagene-autoleucel", "mm", "MM", 0.95, 0.22),
)
CRS_ANY = "crs-any-grade"
NEURO_ANY = "neurotoxicity-any-grade"


def _indication(data: PatientData) -> tuple[str | None, str, tuple[str, ...]]:
    """(indication, why-not, refs): exactly one distinct mapped indication is needed."""
    values = sorted({v for v, _ in data.indications})
    refs = tuple(r for _, r in data.indications)
    if len(values) == 1:
        return values[0], "", refs
    if not values:
        return None, "no Condition mapped to an indication in the codebook", ()
    return None, f"several indications recorded ({', '.join(values)})", refs


def _baseline_indeterminate(
    when: datetime, text: str, missing: tuple[str, ...], left_out: tuple[str, ...] = ()
) -> ScoreResult:
    preds = (
        Prediction(CRS_ANY, "Any-grade CRS", rationale=text),
        Prediction(NEURO_ANY, "Any-grade neurologic toxicity", rationale=text),
    )
    return ScoreResult("product-baseline", PRODUCT_CITATION, when, "infusion", None, preds, (), missing, left_out)


def product_baseline(data: PatientData, at: datetime) -> list[ScoreResult]:
    infusion = data.first_event(C.CART_INFUSION)
    indication, why_not, cond_refs = _indication(data)
    missing: list[str] = []
    reasons: list[str] = []
    if infusion is None or infusion.product is None:
        missing.append(f"{C.CART_INFUSION} product")
        reasons.append("no CAR T infusion recorded" if infusion is None else "infused product not identified")
    if indication is None:
        missing.append(C.INDICATION)
        reasons.append(why_not)
    when = infusion.start if infusion else at
    if infusion is not None and infusion.start > at:
        return []
    row = next(
        (r for r in PRODUCT_RATES if infusion and r.product == infusion.product and r.indication == indication), None
    )
    if row is None and not missing:
        missing.append("product-indication pair")
        reasons.append(f"no pivotal-trial rate for {infusion.product if infusion else '?'} in {indication}")
    if missing:
        return [_baseline_indeterminate(when, f"Indeterminate: {'; '.join(reasons)}.", tuple(missing))]
    assert row is not None and infusion is not None
    earlier = _left_out_anchors(data, {C.CART_INFUSION: infusion.start})  # another product, maybe
    if earlier:
        text = f"Indeterminate: {_left_out_text(earlier)}."
        return [_baseline_indeterminate(when, text, left_out_missing(earlier), tuple(r.ref for r in earlier))]
    common = (
        f"{row.product} for {row.population}: pivotal-trial incidence (seed 003 Table 1). A population rate, not an "
        "individual prediction; the CRS rates come from different grading scales."
    )
    preds = (
        Prediction(CRS_ANY, "Any-grade CRS", probability=row.crs, rationale=f"Any-grade CRS {row.crs:.0%}. {common}"),
        Prediction(
            NEURO_ANY,
            "Any-grade neurologic toxicity",
            probability=row.neuro,
            rationale=f"Any-grade neurologic toxicity {row.neuro:.0%}. {common}",
        ),
    )
    return [
        ScoreResult("product-baseline", PRODUCT_CITATION, when, "infusion", None, preds, (infusion.ref, *cond_refs))
    ]


# --- Disease burden (seed 001, Wudhikarn et al., Blood 2021, Table 2) ---------------------

BURDEN_CITATION = (
    "Disease status before lymphodepletion, morphologic (BM blasts >= 5% or extramedullary disease) vs MRD: "
    "HR 2.20 (95% CI 1.09-4.41), univariate, for relapsed/refractory disease after 19-28z CD19 CAR T in adult "
    "B-ALL (Wudhikarn K et al., Blood 2021, Table 2)"
)
MORPHOLOGIC_BLASTS_PCT = 5.0  # "BM blasts >= 5%" (seed 001)
BURDEN_HR = 2.20


# A marrow or imaging result older than this before lymphodepletion does not describe the
# disease status "before lymphodepletion" (operational choice; seed 001 gives no window).
BURDEN_LOOKBACK = timedelta(days=30)


def _latest_before(series: list[Sample], t: datetime) -> Sample | None:
    before = [s for s in series if t - BURDEN_LOOKBACK <= s.t < t]
    return before[-1] if before else None


def disease_burden(data: PatientData, at: datetime) -> list[ScoreResult]:
    indication, why_not, cond_refs = _indication(data)
    if indication is not None and indication != "b-all":
        return []  # applies only to B-ALL
    ld = lymphodepletion(data)
    day0 = data.first_event(C.CART_INFUSION)
    anchor: Administration | None = ld or day0
    label = "pre-lymphodepletion" if ld else "pre-infusion"
    missing: list[str] = [] if indication else [C.INDICATION]
    if anchor is None:
        missing.append(f"{C.LYMPHODEPLETION} or {C.CART_INFUSION}")
    elif anchor.start > at:
        return []
    cut = anchor.start if anchor else at
    blasts = _latest_before(data.series(C.BM_BLASTS), cut)
    emd = _latest_before(data.series(C.EXTRAMEDULLARY_DISEASE), cut)
    scope = "Applies only to B-ALL (seed 001 cohort: 56 adults, 19-28z). ICD-10-CM C91.0 does not tell B- from T-ALL."
    morphologic = (blasts is not None and (blasts.value or 0) >= MORPHOLOGIC_BLASTS_PCT) or (
        emd is not None and emd.code == "present"
    )
    mrd_only = blasts is not None and emd is not None and not morphologic
    if not (morphologic or mrd_only):
        missing += [c for c, s in ((C.BM_BLASTS, blasts), (C.EXTRAMEDULLARY_DISEASE, emd)) if s is None]
    if missing:
        text = f"Indeterminate: missing {', '.join(missing)}{' (' + why_not + ')' if why_not else ''}. {scope}"
        pred = Prediction("relapse-after-car-t", "Relapsed/refractory disease after CAR T", rationale=text)
        return [ScoreResult("disease-burden", BURDEN_CITATION, cut, label, None, (pred,), (), tuple(missing))]
    if data.left_out and anchor is not None:
        window = Window(cut, cut - BURDEN_LOOKBACK, cut - timedelta(microseconds=1), latest=True)
        picked: dict[str, Sample | None] = {C.BM_BLASTS: blasts, C.EXTRAMEDULLARY_DISEASE: emd}
        # A left-out lymphodepletion before the cut (or before the recorded one) would move it; so
        # would an earlier left-out infusion.
        anchors: dict[str, datetime] = {C.LYMPHODEPLETION: anchor.start}
        if day0 is not None:
            anchors[C.CART_INFUSION] = day0.start
        rows = _left_out_values(data, window, picked) + _left_out_anchors(data, anchors)
        if rows:
            text = f"Indeterminate: {_left_out_text(rows)}. {scope}"
            pred = Prediction("relapse-after-car-t", "Relapsed/refractory disease after CAR T", rationale=text)
            rs = (pred,)
            refs = tuple(r.ref for r in rows)
            return [
                ScoreResult("disease-burden", BURDEN_CITATION, cut, label, None, rs, (), left_out_missing(rows), refs)
            ]
    used = [s for s in (blasts, emd) if s is not None]
    facts = "; ".join(f"{s.concept} {s.shown} at {_t(s.t)}" for s in used)
    if morphologic:
        rr, group = BURDEN_HR, f"morphologic disease (BM blasts >= {MORPHOLOGIC_BLASTS_PCT:g}% or extramedullary)"
    else:
        rr, group = 1.0, "MRD-only (the reference group)"
    text = f"{group}: {facts}. Relative risk {rr:g} against MRD-only (HR 2.20, 95% CI 1.09-4.41). {scope}"
    pred = Prediction(
        "relapse-after-car-t", "Relapsed/refractory disease after CAR T", relative_risk=rr, rationale=text
    )
    return [
        ScoreResult("disease-burden", BURDEN_CITATION, cut, label, None, (pred,), (*(s.ref for s in used), *cond_refs))
    ]


def all_scores(data: PatientData, at: datetime, cfg: ScoreConfig) -> list[ScoreResult]:
    return [
        *easix_scores(data, at, cfg),
        *pennisi_scores(data, at, cfg),
        *product_baseline(data, at),
        *disease_burden(data, at),
    ]
