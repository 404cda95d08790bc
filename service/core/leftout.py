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

from bisect import bisect_right
from dataclasses import replace
from datetime import datetime
from functools import cache
from typing import NamedTuple

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


@cache  # a handful of methods; asked for every sample of every course
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


# How a left-out row's time is read (`_feeding`): any window (no time), up to `at` (a drug or an
# event: it may still run in the window, or be day 0 / a masking drug), or the window itself.
ANY_TIME, UNTIL_AT, IN_WINDOW = 0, 1, 2


class _Feeding(NamedTuple):
    row: LeftOut
    read: int
    # A temperature: the first masking drug's start after it (None: none follows); a fever before
    # the window counts when such a drug started by `at` (ASTCT footnote).
    masked_from: datetime | None


def _feeding(data: PatientData, method: str) -> list[_Feeding]:
    """The left-out rows whose concept feeds `method`, in order, each with how its time is read:
    once per patient and scale (the course asks at every sample)."""

    def feeding() -> list[_Feeding]:
        feeds, out = inputs(method), []
        starts = sorted(a.start for c in FEVER_MASKING_DRUGS for a in data.given(c))
        for row in data.left_out:
            if row.concept not in feeds:
                continue
            spec = concept_spec(row.concept or "")
            drug = row.concept == UNKNOWN_DRUG or (
                spec is not None and spec.kind in (Kind.DRUG, Kind.VASOPRESSOR, Kind.EVENT)
            )
            masked_from = None
            if row.t is not None and row.concept == C.BODY_TEMPERATURE:
                after = bisect_right(starts, row.t)
                masked_from = starts[after] if after < len(starts) else None
            out.append(_Feeding(row, ANY_TIME if row.t is None else UNTIL_AT if drug else IN_WINDOW, masked_from))
        return out

    return data.once(("left-out", method, len(data.left_out)), feeding)


def _in_time(f: _Feeding, lo: datetime, at: datetime, fever_search: bool) -> bool:
    t = f.row.t
    if f.read == ANY_TIME or t is None:
        return True
    if f.read == UNTIL_AT:
        return t <= at
    if lo <= t <= at:
        return True
    return fever_search and t < at and f.masked_from is not None and f.masked_from <= at


def _standing_notes(data: PatientData, method: str) -> tuple[str, list[LeftOut]]:
    """What concerns every result of `method` whatever its time: the note on inputs read under a
    site setting ("" when none) and the left-out rows of unknown kind. Once per patient and
    scale (the course asks at every sample; a feed without timezones has one per input)."""

    def notes() -> tuple[str, list[LeftOut]]:
        feeds = inputs(method)
        assumed = [i for i in data.assumed if i.concept in feeds]
        unknown = [r for r in data.left_out if r.concept is None]  # not known what they would feed
        return (_assumed_note(assumed) if assumed else "", unknown)

    return data.once(("left-out-standing", method, len(data.left_out), len(data.assumed)), notes)


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
    fever_search = method in CRS_METHODS
    rows = [f.row for f in _feeding(data, method) if _in_time(f, lo, at, fever_search)]
    assumed_note, unknown = _standing_notes(data, method)
    if not rows and not assumed_note and not unknown:
        return result
    shown = result.grade if result.grade is not None else (result.floor or 0)
    deciding: list[LeftOut] = []
    standing: list[LeftOut] = []
    for r in rows:  # one pass: `r not in deciding` compared whole rows, rows x rows per time point
        (deciding if ceiling(method, r.concept or "", result) > shown else standing).append(r)
    notes: list[str] = []
    if assumed_note:
        notes.append(assumed_note)
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
