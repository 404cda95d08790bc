"""Inputs left out of grading (lenient handling): when can one change a grade?

A resource the rules cannot use (bad date, unknown unit, implausible value, ...) is left out and
named (`PatientData.left_out`). For each scale and time point this module decides, per left-out
row, whether its data could have changed the grade the other data give:

- the row's concept must feed the scale, and its time must fall where the scale reads that
  concept (a window value: in [at - window, at]; a drug or event: at or before `at`; a
  temperature without fever: also a fever before the window that a later masking drug hides).
  A row with an unknown time could be in any window;
- the row's ceiling (the worst grade its concept can give on this scale, given what the other
  data already show) must be above the grade.

Such a row makes the result indeterminate, with the other data's grade as its floor; any other
row leaves the grade standing and is named in the rationale. Rationales of results with no
left-out row are unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from .astct import CODED_ICANS_DOMAINS, CRS_METHOD, HYPOTENSION_NO_PRESSOR_GRADE, ICANS_CONCEPTS, ICANS_METHOD
from .astct import TOOL_MAX_GRADE as ICANS_TOOL_MAX
from .concepts import C, Kind
from .concepts import spec as concept_spec
from .facts import CRS_FACT_CONCEPTS, FEVER_MASKING_DRUGS
from .grading import FEVER_GRADE, IGNORED_SHOWN, MAX_GRADE
from .model import BIRTH_DATE, UNKNOWN_DRUG, GradeResult, Ignored, LeftOut, PatientData
from .older import CARTOX, CRES_METHOD, CTCAE4, CTCAE5, LEE, MSKCC, PENN, Scale

OLDER: dict[str, Scale] = {sc.method: sc for sc in (LEE, PENN, MSKCC, CARTOX, CTCAE4, CTCAE5)}
CRS_METHODS = frozenset({CRS_METHOD, *OLDER})
CRES_CODED = (C.CONSCIOUSNESS, C.SEIZURE, C.MOTOR_WEAKNESS, C.CEREBRAL_EDEMA)
BP = (C.SYSTOLIC_BP, C.MEAN_ARTERIAL_PRESSURE)
FEVER_STARTERS = (C.BODY_TEMPERATURE, *FEVER_MASKING_DRUGS, C.CART_INFUSION)


def inputs(method: str) -> frozenset[str]:
    """The concepts a scale reads (and the birth date, for the age rules; an unknown drug for CRS)."""
    if method in CRS_METHODS:
        return CRS_FACT_CONCEPTS | {BIRTH_DATE, C.SPO2, UNKNOWN_DRUG}
    if method == ICANS_METHOD:
        return ICANS_CONCEPTS | {BIRTH_DATE}
    if method == CRES_METHOD:
        return frozenset({C.CARTOX_10, *CRES_CODED})
    return frozenset()


def ceiling(method: str, concept: str, result: GradeResult) -> int:
    """The worst grade a value of `concept` could give on this scale, given the result of the rest."""
    if concept == BIRTH_DATE:
        return 0  # an unknown age is graded by the rules' own age-unknown path, which says so
    if method == ICANS_METHOD:
        if concept in (C.ICE_SCORE, C.CAPD_SCORE):
            return ICANS_TOOL_MAX
        return MAX_GRADE if concept in dict(CODED_ICANS_DOMAINS) else 0
    if method == CRES_METHOD:
        return 3 if concept == C.CARTOX_10 else (MAX_GRADE if concept in CRES_CODED else 0)
    if method in CRS_METHODS and concept == UNKNOWN_DRUG:
        return MAX_GRADE  # it could be a vasopressor, or a drug that masks an earlier fever
    if method not in CRS_METHODS or concept not in CRS_FACT_CONCEPTS:
        return 0
    crs = result.crs
    fever = crs is not None and (bool(crs.fever_present) or crs.fever_masked)
    if not fever:
        # Without fever nothing else counts; a temperature, a masking drug or day 0 could establish CRS.
        return MAX_GRADE if concept in FEVER_STARTERS else 0
    if concept == C.BODY_TEMPERATURE:
        return FEVER_GRADE  # CRS is already present: a further temperature only confirms fever
    if concept in BP:
        sc = OLDER.get(method)
        return HYPOTENSION_NO_PRESSOR_GRADE if sc is None else (sc.hypotension_no_pressor or 0)
    if concept in (C.CREATININE, C.AST, C.ALT):
        return 0 if method == CRS_METHOD else MAX_GRADE
    if concept in FEVER_MASKING_DRUGS or concept == C.CART_INFUSION:
        return 0
    return MAX_GRADE  # vasopressors, oxygen device, flow, FiO2


def _in_time(row: LeftOut, data: PatientData, lo: datetime, at: datetime, fever_search: bool) -> bool:
    if row.t is None:
        return True
    spec = concept_spec(row.concept or "")
    if row.concept == UNKNOWN_DRUG or (spec is not None and spec.kind in (Kind.DRUG, Kind.VASOPRESSOR, Kind.EVENT)):
        return row.t <= at  # may still run in the window, or be day 0 / a masking drug
    if lo <= row.t <= at:
        return True
    if fever_search and row.concept == C.BODY_TEMPERATURE and row.t < at:
        # A fever before the window counts when a masking drug followed it (ASTCT footnote).
        return any(row.t < a.start <= at for c in FEVER_MASKING_DRUGS for a in data.given(c))
    return False


def _named(rows: list[LeftOut]) -> str:
    shown = "; ".join(f"{r.ref} at {r.path} ({r.reason})" for r in rows[:IGNORED_SHOWN])
    more = f"; and {len(rows) - IGNORED_SHOWN} more" if len(rows) > IGNORED_SHOWN else ""
    return shown + more


def _assumed_note(items: list[Ignored]) -> str:
    shown = ", ".join(i.ref for i in items[:IGNORED_SHOWN])
    more = f" and {len(items) - IGNORED_SHOWN} more" if len(items) > IGNORED_SHOWN else ""
    return f"Assumed: {items[0].reason}: {shown}{more}."


def with_left_out(result: GradeResult, data: PatientData, lo: datetime, at: datetime) -> GradeResult:
    """`result` with the left-out inputs that concern it: named, and indeterminate when one could
    change the grade. Unchanged when nothing was left out or assumed."""
    if not data.left_out and not data.assumed:
        return result
    method = result.method
    feeds = inputs(method)
    assumed = [i for i in data.assumed if i.concept in feeds]
    fever_search = method in CRS_METHODS
    rows = [r for r in data.left_out if r.concept in feeds and _in_time(r, data, lo, at, fever_search)]
    unknown = [r for r in data.left_out if r.concept is None]  # not known what they would feed
    if not rows and not assumed and not unknown:
        return result
    shown = result.grade if result.grade is not None else (result.floor or 0)
    deciding = [r for r in rows if ceiling(method, r.concept or "", result) > shown]
    standing = [r for r in rows if r not in deciding]
    notes: list[str] = []
    if assumed:
        notes.append(_assumed_note(assumed))
    if standing:
        notes.append(f"Left out (cannot change this grade): {_named(standing)}.")
    if unknown:
        notes.append(f"Left out (input of unknown kind, not graded): {_named(unknown)}.")
    if not deciding:
        return replace(result, rationale=" ".join([result.rationale, *notes]))
    missing = result.missing + tuple(f"{r.concept} ({r.ref}: left out)" for r in deciding)
    if result.grade is None:
        rationale = " ".join([result.rationale, f"Left out (could change the grade): {_named(deciding)}.", *notes])
        return replace(result, rationale=rationale, missing=missing)
    floor = result.grade or None
    verdict = f"Indeterminate: input left out that could change the grade: {_named(deciding)}" + (
        f"; at least grade {floor} from the data present." if floor else "."
    )
    rationale = " ".join([verdict, f"From the other data: {result.rationale}", *notes])
    basis = result.basis if floor else ()
    return replace(result, grade=None, floor=floor, verdict=verdict, rationale=rationale, missing=missing, basis=basis)
