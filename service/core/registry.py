"""Every grading scale, in output order: one row per scale.

A scale is graded either from the shared per-window CRS facts (`from_facts`: ASTCT CRS and the
older CRS scales, which read one `facts.Facts` per time point) or from the patient data directly
(`from_data`: ICANS, CRES). Adding an older CRS scale is one `older.Scale` row and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from .astct import CRS_METHOD, CRS_SCALE, ICANS_METHOD, ICANS_SCALE, crs_from_facts, grade_icans
from .config import GradingConfig
from .facts import Facts
from .leftout import with_left_out
from .model import GradeResult, PatientData
from .older import CARTOX, CRES_METHOD, CRES_SCALE, CTCAE4, CTCAE5, LEE, MSKCC, PENN, Scale, grade_cres, grade_scale

FromFacts = Callable[[Facts, bool], GradeResult]
FromData = Callable[[PatientData, datetime, GradingConfig, bool], GradeResult]


@dataclass(frozen=True)
class ScaleSpec:
    method: str  # the method code (CodeSystem/method)
    name: str  # the scale's name with its source
    from_facts: FromFacts | None = None
    from_data: FromData | None = None

    def grade(self, facts: Facts, brief: bool = False) -> GradeResult:
        """This scale's result at `facts.at`, from the facts or from their data, with the inputs
        left out of grading named (and the result indeterminate when one could change it).
        `brief`: the grade without its rationale and inputs (grading.combine), for the course."""
        if self.from_facts is not None:
            result = self.from_facts(facts, brief)
        else:
            assert self.from_data is not None
            result = self.from_data(facts.data, facts.at, facts.cfg, brief)
        return with_left_out(result, facts.data, facts.lo, facts.at)


def _older(sc: Scale) -> ScaleSpec:
    return ScaleSpec(sc.method, sc.name, from_facts=partial(grade_scale, sc))


REGISTRY: tuple[ScaleSpec, ...] = (
    ScaleSpec(CRS_METHOD, CRS_SCALE, from_facts=crs_from_facts),
    ScaleSpec(ICANS_METHOD, ICANS_SCALE, from_data=grade_icans),
    _older(LEE),
    _older(PENN),
    _older(MSKCC),
    _older(CARTOX),
    _older(CTCAE4),
    _older(CTCAE5),
    ScaleSpec(CRES_METHOD, CRES_SCALE, from_data=grade_cres),
)
BY_METHOD: dict[str, ScaleSpec] = {s.method: s for s in REGISTRY}
